import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { createServer, type Socket } from "node:net";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { bind, startServer } from "../../services/common/grpc/server.js";
import { wireBuffer } from "../../services/common/grpc/wire.js";
import { toTensor } from "../../services/common/tensor-codec.js";
import { BatchesResponseSchema, BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

/**
 * The far end of the transport benchmark, in its own process (as a real peer is) so that sender and
 * receiver each have a core: a gRPC server speaking the buffer's contract (acks pushes, streams prebuilt batches) and a
 * raw TCP server doing the same with bare bytes.
 */
const D_MODEL = Number(process.argv[2]);
const transport = RunConfigSchema.parse({}).transport;
/** As the buffer and the producer allocate what they send: with room for the message's other fields in front. */
const floats = (n: number) => {
  const memory = wireBuffer(n * 4);
  return new Float32Array(memory.buffer, memory.byteOffset, n).fill(1);
};
const unimplemented = async (): Promise<never> => {
  throw new FieldError("method", "not part of the transport benchmark", status.UNIMPLEMENTED);
};

const grpc = await startServer("127.0.0.1:0", transport, [
  bind(BufferService, {
    push: async function* (requests) {
      for await (const req of requests) {
        const rows = req.chunk?.activations?.shape[0] ?? 0;
        yield { sequence: req.chunk?.sequence ?? 0n, rowsAccepted: rows };
      }
    },
    batches: async function* (req, ctx) {
      const rows = req.batchSize;
      const batch = create(BatchesResponseSchema, {
        activations: toTensor(floats(rows * D_MODEL), DType.FP32, [rows, D_MODEL]),
      });
      // The adapter resumes only after the last message was serialised, so one message is reused.
      // As the buffer, max_batches 0 streams until the trainer cancels.
      for (let i = 0n; (req.maxBatches === 0n || i < req.maxBatches) && !ctx.signal.aborted; i++) {
        batch.sequence = i;
        yield batch;
      }
    },
    status: unimplemented,
    pause: unimplemented,
    resume: unimplemented,
    drain: unimplemented,
  }),
]);

/** Raw TCP: a client first sends 8 bytes; upload = [0, total], download = [chunk, count]. */
const tcp = createServer((socket: Socket) => {
  socket.once("data", (head: Buffer) => {
    const chunk = head.readUInt32LE(0);
    const count = head.readUInt32LE(4);
    if (chunk === 0) {
      let left = count * 1024 * 1024 - (head.length - 8);
      socket.on("data", (d: Buffer) => {
        left -= d.length;
        if (left <= 0) socket.end(Buffer.from([1]));
      });
      return;
    }
    const payload = Buffer.alloc(chunk, 1);
    let sent = 0;
    const pump = () => {
      while (sent < count) {
        sent++;
        if (!socket.write(payload)) return void socket.once("drain", pump);
      }
      socket.end();
    };
    pump();
  });
});
await new Promise<void>((r) => tcp.listen(0, "127.0.0.1", r));
const tcpAddr = tcp.address();
process.send!({ grpc: grpc.address, tcpPort: typeof tcpAddr === "object" && tcpAddr ? tcpAddr.port : 0 });
process.once("message", async () => {
  tcp.close();
  await grpc.close(100);
  process.disconnect();
});
