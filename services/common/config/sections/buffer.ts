import { z } from "zod";
import { Address, DTypeName } from "./dtype.js";

export const HookPointPool = z
  .object({
    name: z.string().min(1).describe("Hook point, e.g. blocks.1.hook_resid_post."),
    dModel: z.number().int().positive().describe("Row width; chunks of another width are refused."),
  })
  .strict();

/** One buffer process of a sharded run: where producers and trainers reach it, and the pools it holds. */
export const BufferShard = z
  .object({
    address: Address.describe("Where producers and trainers reach this shard (its Service in a cluster)."),
    hookPoints: z
      .array(z.string().min(1))
      .min(1)
      .describe("Pools this shard holds (names from buffer.hookPoints); a pool on several shards is spread over them."),
  })
  .strict();

/** The activation buffer: one fixed pool per hook point, optionally spread over several processes (shards). */
export const BufferSection = z
  .object({
    address: Address.default("127.0.0.1:50051").describe(
      "Where this buffer process serves gRPC (its bind address); with no buffer.shards, also where producers and trainers reach it.",
    ),
    shards: z
      .array(BufferShard)
      .default([])
      .describe(
        "Buffer processes of the run and the pools each holds; empty means one buffer at buffer.address holding every pool. A producer pushes a hook point's rows to one of the shards holding it (its shardIndex modulo their number); a trainer reads its hook points from every shard holding them.",
      ),
    shard: z.number().int().min(0).default(0).describe("Which entry of buffer.shards this buffer process is."),
    dtype: DTypeName.default("fp32").describe("Wire and pool dtype; producers convert once to it."),
    hookPoints: z
      .array(HookPointPool)
      .min(1)
      .default([{ name: "blocks.1.hook_resid_post", dModel: 64 }])
      .refine((pools) => new Set(pools.map((p) => p.name)).size === pools.length, "hook point names must be unique")
      .describe("Pools, one per hook point."),
    capacityRows: z
      .number()
      .int()
      .positive()
      .default(65536)
      .describe("Rows each pool holds; memory = rows x dModel x dtype bytes, allocated once."),
    lowWatermark: z
      .number()
      .gt(0)
      .lt(1)
      .default(0.5)
      .describe("Refill is asked when unconsumed rows fall to this fraction of capacity (Llama Scope, He et al. 2024, refills at half)."),
    mixFloor: z
      .number()
      .min(0)
      .lt(1)
      .default(0.25)
      .describe(
        "Batches are drawn only while at least this fraction of capacity is unconsumed (draining excepted); below it trainers wait.",
      ),
    epochsPerFill: z.number().int().positive().max(255).default(1).describe("Times each row of a fill is served to each consumer."),
    checkFinite: z.boolean().default(true).describe("Refuse chunks holding NaN or Inf; their rows are counted as non_finite."),
    defaultShare: z.enum(["fan_out", "split"]).default("fan_out").describe("Share mode for trainers that do not choose one."),
    pushWaitMs: z
      .number()
      .int()
      .positive()
      .default(30000)
      .describe("How long a chunk may wait for free rows (holding its stream) before the rest is dropped as pool_full."),
    trainerAwayMs: z
      .number()
      .int()
      .positive()
      .default(60000)
      .describe(
        "How long a trainer may be away from the buffer: one whose stream broke keeps reconnecting this long before it stops with an error (its checkpoint kept), and the buffer keeps its place in the pool this long, so that it reads on from there when it comes back, reconnected or restarted.",
      ),
    stateFile: z
      .string()
      .default("")
      .describe(
        "Where the buffer keeps its row ledger and de-duplication marks, so that a restarted buffer goes on with them (rows its predecessor held are counted lost, never accepted twice); put it on a volume that outlives the pod. Empty keeps nothing (saeflow up sets <run.dir>/buffer.state.json).",
      ),
    trainers: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe(
        "Trainer processes in the run (trainer.shardCount): each buffer shard waits for those that train one of its hook points, and once they have all announced over NATS that they are done, it stops its producers and ends, so the run ends by itself (saeflow up sets it; in a cluster the chart sets it to the trainers' replicas). 0 leaves the end to a Drain.",
      ),
  })
  .strict()
  .refine((b) => b.mixFloor < b.lowWatermark, {
    path: ["mixFloor"],
    message: "must be below lowWatermark, or trainers would wait before a refill is asked",
  })
  .superRefine((b, ctx) => {
    const pools = new Set(b.hookPoints.map((h) => h.name));
    const placed = new Set<string>();
    const addresses = new Set<string>();
    b.shards.forEach((shard, i) => {
      if (addresses.has(shard.address))
        ctx.addIssue({ code: "custom", path: ["shards", i, "address"], message: `${shard.address} is another shard's address` });
      addresses.add(shard.address);
      shard.hookPoints.forEach((h, j) => {
        placed.add(h);
        if (!pools.has(h))
          ctx.addIssue({ code: "custom", path: ["shards", i, "hookPoints", j], message: `"${h}" has no pool in buffer.hookPoints` });
        else if (shard.hookPoints.indexOf(h) !== j)
          ctx.addIssue({ code: "custom", path: ["shards", i, "hookPoints", j], message: `${h} is listed twice` });
      });
    });
    if (b.shards.length) {
      for (const h of pools)
        if (!placed.has(h)) ctx.addIssue({ code: "custom", path: ["shards"], message: `no shard holds the pool ${h}` });
    }
    const count = Math.max(1, b.shards.length);
    if (b.shard >= count) ctx.addIssue({ code: "custom", path: ["shard"], message: `must be below the number of shards (${count})` });
  });
