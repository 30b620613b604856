import { create } from "@bufbuild/protobuf";
import { fork } from "node:child_process";
import { connect, createServer, type Socket } from "node:net";
import { fileURLToPath } from "node:url";
import { ActivationBuffer } from "../../services/buffer/activation-buffer.js";
import type { ChunkRows } from "../../services/buffer/pool.js";
import { type RunningBuffer, startBuffer } from "../../services/buffer/buffer.js";
import { loadConfig, RunConfigSchema } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { toTensor } from "../../services/common/tensor-codec.js";
import {
  type BatchesResponse,
  BufferService,
  type PushResponse,
  PushRequestSchema,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { gbPerSecond, line, median, packageVersion, round } from "./stats.js";

/**
 * The buffer's two costs, each beside a reference measured in the same run:
 * - gather: random minibatches copied out of a full pool, row by row, against one memcpy of the
 *   same bytes, for 1.5 KiB and 8 KiB rows (fp32 d_model 384 and 2048);
 * - end to end: rows pushed by a producer client, shuffled in the buffer and streamed to a trainer
 *   client over gRPC on loopback, against the same bytes relayed producer -> peer -> trainer over raw
 *   TCP. The buffer (and the relay) run in a child process, so each side has a core.
 */
const ROWS = [
  { label: "1.5 KiB", dModel: 384 },
  { label: "8 KiB", dModel: 2048 },
] as const;
/** Gather: a pool of 96 MiB (1.5 KiB rows) or 128 MiB (8 KiB rows), far larger than the caches. */
const GATHER_POOL_ROWS = 65536;
const BATCH = 1024;
/** End to end: producer-sized chunks (a producer sends 8 contexts of 127 positions) and window. */
const CHUNK = 1024;
const IN_FLIGHT = 8;
const E2E_POOL_BYTES = 64 << 20;
const E2E_BYTES = 512 << 20;
const E2E_ROUNDS = 5;
/** Buffer shards side by side: 1, 2 and 4, each moving this many bytes. */
const SHARDS = [1, 2, 4] as const;
const SHARD_BYTES = 256 << 20;
const PEER_FLAG = "SAEFLOW_BUFFER_BENCH_PEER";
const transport = RunConfigSchema.parse({}).transport;
const HOOK = "blocks.1.hook_resid_post";

/** A run config with one pool of `capacity` rows of `dModel` fp32 on the default hook point. */
function benchConfig(dModel: number, capacity: number) {
  return loadConfig({
    sets: ["run.id=bench", `buffer.hookPoints=[{name: ${HOOK}, dModel: ${dModel}}]`, `buffer.capacityRows=${capacity}`],
  });
}

/** Gather and memcpy rounds, alternating so that load from elsewhere on the machine hits both alike. */
const GATHER_ROUNDS = 5;

/** Gather against memcpy: each figure the median over rounds, the ratio the median of the rounds' ratios. */
async function gather(dModel: number, capacity: number): Promise<{ gatherGbps: number; memcpyGbps: number; ratio: number }> {
  const buffer = new ActivationBuffer({ runId: "bench", seed: 1, config: benchConfig(dModel, capacity).buffer });
  const hook = buffer.hooks.get(HOOK)!;
  const rowBytes = hook.pool.rowBytes;
  const source: ChunkRows = {
    data: Buffer.alloc(BATCH * rowBytes, 1),
    tokenIds: [],
    contextIds: Array.from({ length: BATCH }, (_, i) => i >> 7),
    contextBase: 0,
    firstRowId: 0,
    cycle: 1,
  };
  const refill = () => {
    while (hook.pool.free >= BATCH) hook.add(source, 0, BATCH, undefined);
  };
  refill();
  const cursor = hook.pool.openCursor();
  const out = Buffer.from(new ArrayBuffer(BATCH * rowBytes));
  const batches = Math.max(64, Math.round((512 << 20) / (BATCH * rowBytes)));
  // Takes are timed alone: the refill between them is the producers' work, not the gather's.
  const gatherRound = () => {
    let ms = 0;
    for (let i = 0; i < batches; i++) {
      if (hook.pool.unread(cursor) < BATCH) refill();
      const t0 = performance.now();
      hook.take(cursor, BATCH, out);
      ms += performance.now() - t0;
    }
    return ms;
  };
  // The reference: one copy of the same number of bytes per batch, from a block of DRAM the size of the pool.
  const block = Buffer.alloc(capacity * rowBytes, 1);
  const span = BATCH * rowBytes;
  const slots = Math.floor(block.length / span);
  const memcpyRound = () => {
    const t0 = performance.now();
    for (let i = 0; i < batches; i++) {
      const at = ((i * 7) % slots) * span;
      block.copy(out, 0, at, at + span);
    }
    return performance.now() - t0;
  };
  gatherRound();
  memcpyRound();
  const bytes = batches * BATCH * rowBytes;
  const gathers: number[] = [];
  const memcpys: number[] = [];
  for (let r = 0; r < GATHER_ROUNDS; r++) {
    gathers.push(gbPerSecond(bytes, gatherRound()));
    memcpys.push(gbPerSecond(bytes, memcpyRound()));
  }
  buffer.close();
  return { gatherGbps: median(gathers), memcpyGbps: median(memcpys), ratio: median(gathers.map((g, i) => g / memcpys[i]!)) };
}

/** Median of `repeats` timings after one warm-up, where `fn` times what matters itself and returns ms. */
async function medianOf(repeats: number, fn: () => number | Promise<number>): Promise<number> {
  await fn();
  const times: number[] = [];
  for (let i = 0; i < repeats; i++) times.push(await fn());
  return median(times);
}

/** Pushes `rows` rows in chunks, `IN_FLIGHT` unanswered at most, as a producer's stream does. */
async function produce(address: string, dModel: number, rows: number): Promise<void> {
  const client = createClient(BufferService, address, transport);
  const call = client.push();
  const activations = toTensor(new Float32Array(CHUNK * dModel).fill(0.5), DType.FP32, [CHUNK, dModel]);
  const chunks = rows / CHUNK;
  let answered = 0;
  let wake: (() => void) | undefined;
  const done = new Promise<void>((resolve, reject) => {
    call.on("data", (r: PushResponse) => {
      if (r.code !== 0) return reject(new Error(`push refused: ${r.message}`));
      answered++;
      wake?.();
      if (answered === chunks) resolve();
    });
    call.on("error", reject);
  });
  for (let i = 0; i < chunks; i++) {
    while (i - answered >= IN_FLIGHT) await new Promise<void>((r) => (wake = r));
    // A fresh message per chunk: grpc-js may hold a written message unserialised for a while.
    const contextIds = new Array<number>(CHUNK).fill(i);
    call.write(
      create(PushRequestSchema, {
        chunk: { runId: "bench", hookPoint: HOOK, producerId: "bench", sequence: BigInt(i), activations, contextIds },
      }),
    );
  }
  await done;
  call.end();
  client.close();
}

async function grpcEndToEnd(peer: Peer, dModel: number, rows: number): Promise<number> {
  const capacity = Math.floor(E2E_POOL_BYTES / (dModel * 4));
  const address = await peer.ask<string>({ kind: "buffer", dModel, capacity });
  const ms = await pushAndServe(address, dModel, rows);
  await peer.ask({ kind: "close" });
  return ms;
}

/** A producer and a trainer of one buffer at `address`: rows pushed, all of them served; the milliseconds it took. */
async function pushAndServe(address: string, dModel: number, rows: number): Promise<number> {
  const client = createClient(BufferService, address, transport);
  const t0 = performance.now();
  const trainer = (async () => {
    let got = 0;
    for await (const b of client.batches({ hookPoint: HOOK, trainerId: "bench", batchSize: BATCH }) as AsyncIterable<BatchesResponse>)
      got += b.activations!.shape[0]!;
    return got;
  })();
  await produce(address, dModel, rows);
  await client.drain({});
  const got = await trainer;
  const ms = performance.now() - t0;
  client.close();
  if (got !== rows) throw new Error(`trainer got ${got} of ${rows} rows`);
  return ms;
}

/**
 * Buffer shards side by side on loopback: `n` buffer processes, each fed and drained by its own
 * producer-and-trainer process, all at once. Served rows/s of them all together.
 */
async function shardsRowsPerSecond(n: number, dModel: number, rowsPerShard: number): Promise<number> {
  const buffers = await Promise.all(Array.from({ length: n }, () => startPeer()));
  const loads = await Promise.all(Array.from({ length: n }, () => startPeer()));
  try {
    const capacity = Math.floor(E2E_POOL_BYTES / (dModel * 4));
    const addresses = await Promise.all(buffers.map((b) => b.ask<string>({ kind: "buffer", dModel, capacity })));
    const t0 = performance.now();
    await Promise.all(loads.map((l, i) => l.ask<number>({ kind: "load", address: addresses[i]!, dModel, rows: rowsPerShard })));
    return (n * rowsPerShard) / ((performance.now() - t0) / 1000);
  } finally {
    await Promise.all([...buffers, ...loads].map((p) => p.close()));
  }
}

/** The same bytes producer -> relay -> trainer over raw TCP, in the same chunk and batch sizes. */
async function tcpEndToEnd(port: number, dModel: number, rows: number): Promise<number> {
  const total = rows * dModel * 4;
  const t0 = performance.now();
  const trainer = connect(port, "127.0.0.1");
  await new Promise<void>((r) => trainer.once("connect", () => r()));
  trainer.write("T");
  const received = new Promise<void>((resolve, reject) => {
    let left = total;
    trainer.on("data", (d: Buffer) => {
      left -= d.length;
      if (left === 0) resolve();
    });
    trainer.once("error", reject);
  });
  const producer = connect(port, "127.0.0.1");
  await new Promise<void>((r) => producer.once("connect", () => r()));
  producer.write("P");
  const payload = Buffer.alloc(CHUNK * dModel * 4, 1);
  for (let sent = 0; sent < rows; sent += CHUNK) {
    if (!producer.write(payload)) await new Promise((r) => producer.once("drain", r));
  }
  await received;
  const ms = performance.now() - t0;
  producer.destroy();
  trainer.destroy();
  return ms;
}

interface Peer {
  tcpPort: number;
  ask<T>(message: { kind: string; dModel?: number; capacity?: number; address?: string; rows?: number }): Promise<T>;
  close(): Promise<void>;
}

async function startPeer(): Promise<Peer> {
  const child = fork(fileURLToPath(import.meta.url), [], {
    execArgv: ["--import", "tsx", ...(process.env.BENCH_PEER_PROF ? ["--cpu-prof", `--cpu-prof-dir=${process.env.BENCH_PEER_PROF}`] : [])],
    env: { ...process.env, [PEER_FLAG]: "1" },
  });
  const answers: Array<(m: unknown) => void> = [];
  child.on("message", (m) => answers.shift()?.(m));
  const exited = new Promise<never>((_, reject) =>
    child.once("exit", (code) => reject(new Error(`buffer bench peer exited with ${code}`))),
  );
  exited.catch(() => undefined);
  const next = () => Promise.race([new Promise<unknown>((resolve) => answers.push(resolve)), exited]);
  const tcpPort = (await next()) as number;
  return {
    tcpPort,
    ask: async <T>(message: object) => {
      const answer = next();
      child.send(message);
      return (await answer) as T;
    },
    close: async () => {
      const gone = new Promise((r) => child.once("exit", r));
      child.send({ kind: "exit" });
      await gone;
    },
  };
}

/** The child: starts buffers on request and relays raw TCP from the producer socket to the trainer socket. */
async function peerMain(): Promise<void> {
  let running: RunningBuffer | undefined;
  let trainer: Socket | undefined;
  let producer: Socket | undefined;
  const pair = () => {
    if (trainer && producer) producer.pipe(trainer);
  };
  const tcp = createServer((socket) => {
    socket.once("data", (head: Buffer) => {
      socket.pause();
      if (head[0] === 0x54) trainer = socket;
      else {
        producer = socket;
        if (head.length > 1) socket.unshift(head.subarray(1));
      }
      socket.once("close", () => {
        if (socket === trainer) trainer = undefined;
        if (socket === producer) producer = undefined;
      });
      pair();
    });
  });
  await new Promise<void>((r) => tcp.listen(0, "127.0.0.1", r));
  const address = tcp.address();
  process.send!(typeof address === "object" && address ? address.port : 0);
  process.on("message", async (m: { kind: string; dModel: number; capacity: number; address: string; rows: number }) => {
    if (m.kind === "load") {
      process.send!(await pushAndServe(m.address, m.dModel, m.rows));
    } else if (m.kind === "buffer") {
      running = await startBuffer(benchConfig(m.dModel, m.capacity), { address: "127.0.0.1:0", bus: null, log: () => undefined });
      process.send!(running.address);
    } else if (m.kind === "close") {
      await running?.stop();
      process.send!("closed");
    } else {
      await running?.stop();
      process.exit(0);
    }
  });
  // The parent went away (finished or failed): nothing more will be asked.
  process.once("disconnect", () => process.exit(0));
}

/** Rows/s through push → shuffle → serve over gRPC for one row width: the buffer stage alone. */
export async function bufferRowsPerSecond(dModel: number, bytes = E2E_BYTES): Promise<number> {
  const peer = await startPeer();
  try {
    const rows = Math.floor(bytes / (dModel * 4) / CHUNK) * CHUNK;
    return rows / ((await medianOf(3, () => grpcEndToEnd(peer, dModel, rows))) / 1000);
  } finally {
    await peer.close();
  }
}

export async function run(): Promise<Record<string, number | string>> {
  const out: Record<string, number | string> = {
    gather_reference: `memcpy: one Buffer.copy of a batch's bytes at a time, on one thread, from a block of memory the pool's size`,
    e2e_reference: `raw TCP relay: producer -> peer process -> trainer over node's net sockets on 127.0.0.1, the same bytes in chunks of ${CHUNK} rows and batches of ${BATCH}`,
    grpc_js: packageVersion("@grpc/grpc-js"),
  };
  for (const { label, dModel } of ROWS) {
    const { gatherGbps, memcpyGbps, ratio } = await gather(dModel, Math.min(GATHER_POOL_ROWS, Math.floor((128 << 20) / (dModel * 4))));
    const key = `gather_${dModel * 4}b`;
    line(`gather ${label} rows (batch ${BATCH})`, gatherGbps, "GB/s", { label: "memcpy", value: memcpyGbps });
    line(`  gather/memcpy GB/s (median of ${GATHER_ROUNDS} rounds)`, ratio, "");
    out[`${key}_gbps`] = round(gatherGbps);
    out[`${key}_memcpy_gbps`] = round(memcpyGbps);
    out[`${key}_vs_memcpy_ratio`] = round(ratio);
  }
  const peer = await startPeer();
  try {
    for (const { label, dModel } of ROWS) {
      const e2eRows = Math.floor(E2E_BYTES / (dModel * 4) / CHUNK) * CHUNK;
      // Rounds alternate gRPC and the raw TCP relay, so load from elsewhere on the machine hits both
      // alike; the ratio is the median of the rounds' ratios.
      await grpcEndToEnd(peer, dModel, e2eRows);
      await tcpEndToEnd(peer.tcpPort, dModel, e2eRows);
      const grpcRates: number[] = [];
      const tcpRates: number[] = [];
      for (let r = 0; r < E2E_ROUNDS; r++) {
        grpcRates.push(e2eRows / ((await grpcEndToEnd(peer, dModel, e2eRows)) / 1000));
        tcpRates.push(e2eRows / ((await tcpEndToEnd(peer.tcpPort, dModel, e2eRows)) / 1000));
      }
      const grpcRows = median(grpcRates);
      const tcpRows = median(tcpRates);
      const ratio = median(grpcRates.map((g, i) => g / tcpRates[i]!));
      const key = `e2e_${dModel * 4}b`;
      line(`push+serve ${label} rows over gRPC`, grpcRows / 1e3, "krows/s", { label: "raw tcp relay", value: tcpRows / 1e3 });
      line(`  gRPC/raw tcp relay rows/s (median of ${E2E_ROUNDS} rounds)`, ratio, "");
      out[`${key}_rows_per_s`] = Math.round(grpcRows);
      out[`${key}_tcp_rows_per_s`] = Math.round(tcpRows);
      out[`${key}_vs_tcp_ratio`] = round(ratio);
    }
  } finally {
    await peer.close();
  }
  // Served rows/s as buffer shards are added, each with its own producer and trainer process.
  const d = 2048;
  const perShard = Math.floor(SHARD_BYTES / (d * 4) / CHUNK) * CHUNK;
  const one = await shardsRowsPerSecond(1, d, perShard);
  for (const n of SHARDS) {
    const rate = n === 1 ? one : await shardsRowsPerSecond(n, d, perShard);
    line(`${n} buffer shard(s), 8 KiB rows, push+serve together`, rate / 1e3, "krows/s", {
      label: `${n} x one shard`,
      value: (n * one) / 1e3,
    });
    out[`shards${n}_rows_per_s`] = Math.round(rate);
    out[`shards${n}_vs_linear_ratio`] = round(rate / (n * one));
  }
  return out;
}

if (process.env[PEER_FLAG] === "1") await peerMain();
