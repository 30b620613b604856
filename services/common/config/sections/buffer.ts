import { z } from "zod";
import { Address, DTypeName } from "./dtype.js";

export const HookPointPool = z
  .object({
    name: z.string().min(1).describe("Hook point, e.g. blocks.1.hook_resid_post."),
    dModel: z.number().int().positive().describe("Row width; chunks of another width are refused."),
  })
  .strict();

/** The activation buffer: one fixed pool per hook point. */
export const BufferSection = z
  .object({
    address: Address.default("127.0.0.1:50051").describe("Where the buffer serves gRPC."),
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
  })
  .strict()
  .refine((b) => b.mixFloor < b.lowWatermark, {
    path: ["mixFloor"],
    message: "must be below lowWatermark, or trainers would wait before a refill is asked",
  });
