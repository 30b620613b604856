import { create } from "@bufbuild/protobuf";
import { connect } from "node:net";
import { fork } from "node:child_process";
import { fileURLToPath } from "node:url";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { createClient, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { wireBuffer } from "../../services/common/grpc/wire.js";
import { toTensor } from "../../services/common/tensor-codec.js";
import { GrpcBatchSource } from "../../services/trainer/batches.js";
import { BufferService, PushRequestSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { gbPerSecond, line, median, packageVersion, round, timed } from "./stats.js";

/**
 * Tensor chunks of 2, 8 and 32 MiB pushed producer→server (Push) and streamed server→client
 * (Batches, read as the trainer reads them) through the gRPC adapter, beside the same bytes over raw
 * TCP on loopback.
 */
const MIB = 1024 * 1024;
const D_MODEL = 1024;
const transport = RunConfigSchema.parse({}).transport;

/** As the producer allocates a chunk: with room for the message's other fields in front (see wireBuffer). */
function floats(n: number): Float32Array {
  const memory = wireBuffer(n * 4);
  return new Float32Array(memory.buffer, memory.byteOffset, n).fill(1);
}

const ROUNDS = 5;

type Client = ServiceClient<typeof BufferService>;

async function grpcUpload(client: Client, chunkMiB: number, count: number): Promise<void> {
  const rows = (chunkMiB * MIB) / (D_MODEL * 4);
  const req = create(PushRequestSchema, {
    chunk: {
      runId: "bench",
      hookPoint: "h",
      producerId: "p",
      activations: toTensor(floats(rows * D_MODEL), DType.FP32, [rows, D_MODEL]),
    },
  });
  const call = client.push();
  let acked = 0;
  const done = new Promise<void>((resolve, reject) => {
    call.on("data", () => {
      if (++acked === count) resolve();
    });
    call.on("error", reject);
  });
  for (let i = 0; i < count; i++) {
    req.chunk!.sequence = BigInt(i);
    if (!call.write(req)) await new Promise((r) => call.once("drain", r));
  }
  await done;
  call.end();
}

/** `count` batches of `chunkMiB`, read as the trainer reads them (GrpcBatchSource: checked, and viewed as float32). */
async function grpcDownload(client: Client, address: string, chunkMiB: number, count: number): Promise<void> {
  const config = RunConfigSchema.parse({
    buffer: { hookPoints: [{ name: "h", dModel: D_MODEL }] },
    producer: { hookPoints: ["h"] },
    trainer: { hookPoints: ["h"], batchSize: (chunkMiB * MIB) / (D_MODEL * 4) },
  });
  const source = new GrpcBatchSource(client, config, 2, { hookPoint: "h", address });
  try {
    for (let got = 0; got < count; got++) if (!(await source.next())) throw new Error(`download: ${got} of ${count} batches`);
  } finally {
    source.close();
  }
}

function tcpRun(port: number, chunkMiB: number, count: number, upload: boolean): Promise<void> {
  return new Promise((resolve, reject) => {
    const socket = connect(port, "127.0.0.1");
    socket.on("error", reject);
    const head = Buffer.alloc(8);
    head.writeUInt32LE(upload ? 0 : chunkMiB * MIB, 0);
    head.writeUInt32LE(upload ? chunkMiB * count : count, 4);
    socket.write(head);
    if (upload) {
      const payload = Buffer.alloc(chunkMiB * MIB, 1);
      let sent = 0;
      const pump = () => {
        while (sent < count) {
          sent++;
          if (!socket.write(payload)) return void socket.once("drain", pump);
        }
      };
      pump();
      socket.on("data", () => (socket.end(), resolve()));
    } else {
      let left = chunkMiB * MIB * count;
      socket.on("data", (d: Buffer) => (left -= d.length));
      socket.on("end", () => (left === 0 ? resolve() : reject(new Error(`tcp download short by ${left}`))));
    }
  });
}

export async function run(): Promise<Record<string, number | string>> {
  const child = fork(fileURLToPath(new URL("./transport-peer.ts", import.meta.url)), [String(D_MODEL)], { execArgv: ["--import", "tsx"] });
  const peer = await new Promise<{ grpc: string; tcpPort: number }>((resolve, reject) => {
    child.once("message", (m) => resolve(m as { grpc: string; tcpPort: number }));
    child.once("exit", (code) => reject(new Error(`transport peer exited with ${code}`)));
  });
  const out: Record<string, number | string> = {
    reference:
      "raw TCP on 127.0.0.1 between the same two node processes (net sockets): the same bytes in the same chunk sizes, written back to back and counted on arrival, no framing",
    grpc_js: packageVersion("@grpc/grpc-js"),
    grpc_flow_control_window_bytes: transport.flowControlWindowBytes,
    grpc_max_message_bytes: transport.maxMessageBytes,
  };
  // One channel for the whole run, as a producer or a trainer keeps its own: each round is a new call
  // on it, so what is timed is the stream, not connecting.
  const client = createClient(BufferService, peer.grpc, transport);
  try {
    for (const mib of [2, 8, 32]) {
      const count = Math.max(8, Math.round(256 / mib));
      const bytes = mib * MIB * count;
      for (const [dir, grpcFn, upload] of [
        ["push", grpcUpload, true],
        ["batches", (c: Client, m: number, n: number) => grpcDownload(c, peer.grpc, m, n), false],
      ] as const) {
        // Rounds alternate gRPC and raw TCP, so load from elsewhere on the machine hits both alike;
        // the ratio is the median of the rounds' ratios.
        await grpcFn(client, mib, count);
        await tcpRun(peer.tcpPort, mib, count, upload);
        const gs: number[] = [];
        const ts: number[] = [];
        for (let r = 0; r < ROUNDS; r++) {
          gs.push(gbPerSecond(bytes, await timed(() => grpcFn(client, mib, count))));
          ts.push(gbPerSecond(bytes, await timed(() => tcpRun(peer.tcpPort, mib, count, upload))));
        }
        const g = median(gs);
        const t = median(ts);
        const ratio = median(gs.map((x, i) => x / ts[i]!));
        line(`grpc ${dir} ${mib} MiB chunks`, g, "GB/s", { label: "raw tcp", value: t });
        line(`  grpc/raw tcp GB/s (median of ${ROUNDS} rounds)`, ratio, "");
        out[`${dir}_${mib}mib_gbps`] = round(g);
        out[`${dir}_${mib}mib_tcp_gbps`] = round(t);
        out[`${dir}_${mib}mib_vs_tcp_ratio`] = round(ratio);
      }
    }
  } finally {
    client.close();
    const exited = new Promise((r) => child.once("exit", r));
    child.send("close");
    await exited;
  }
  return out;
}
