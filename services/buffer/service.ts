import { create } from "@bufbuild/protobuf";
import type { RunConfig } from "../common/config/index.js";
import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { Serving } from "../common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../common/grpc/server.js";
import type { Bus } from "../common/nats.js";
import { BufferService, type PushRequest, PushResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ActivationBuffer } from "./buffer.js";
import { Ingest } from "./ingest.js";
import { RefillCoordinator } from "./refill.js";
import { BatchServer } from "./serve.js";

/** The gRPC face of a buffer. */
export function bufferHandlers(
  buffer: ActivationBuffer,
  ingest: Ingest,
  batches: BatchServer,
  refill: RefillCoordinator | undefined,
): ServiceHandlers<typeof BufferService> {
  return {
    // Reading pauses while a chunk is handled, so a full pool holds the producer back through flow
    // control. Not `for await`: leaving it early destroys the call before its status can be sent.
    push: (call) =>
      new Promise<void>((resolve, reject) => {
        let handled = Promise.resolve();
        call.on("data", (request: PushRequest) => {
          call.pause();
          handled = handled.then(async () => {
            const answer = create(PushResponseSchema, await ingest.push(request));
            // A cancelled producer gets no answer, but its rows were still pooled (a re-send is a duplicate).
            if (call.cancelled || call.writableEnded) return;
            call.write(answer);
            call.resume();
          });
          handled.catch(reject);
        });
        call.once("end", () => handled.then(resolve, reject));
        call.once("cancelled", () => resolve());
        call.once("error", reject);
      }),
    batches: async (request, call) => {
      const abort = new AbortController();
      call.once("cancelled", () => abort.abort());
      await batches.serve(request, { write: (message, done) => call.write(message, () => done()) }, abort.signal);
    },
    status: async () => buffer.status(refill?.producers() ?? []),
    pause: async () => ({ state: buffer.pause() }),
    resume: async () => ({ state: buffer.resume() }),
    drain: async () => {
      const state = buffer.drain();
      return { state, unconsumedRows: BigInt([...buffer.hooks.values()].reduce((sum, h) => sum + h.pool.held, 0)) };
    },
  };
}

export interface StartBufferOptions {
  config: RunConfig;
  /** NATS for the refill handshake; without it producers are held back by gRPC flow control alone. */
  bus?: Bus;
  /** Overrides config.buffer.address (tests bind 127.0.0.1:0). */
  address?: string;
  /** Largest single pool allocation, see PoolOptions. */
  segmentBytes?: number;
}

export interface RunningBuffer {
  buffer: ActivationBuffer;
  server: RunningServer;
  refill: RefillCoordinator | undefined;
  /** host:port actually bound. */
  address: string;
  /** Ends streams, stops NATS handling and the server; resolves when calls are done. */
  close(graceMs?: number): Promise<void>;
}

/** Allocates the pools, serves gRPC and, given a bus, runs the NATS handshake. */
export async function startBuffer(options: StartBufferOptions): Promise<RunningBuffer> {
  const { config } = options;
  const buffer = new ActivationBuffer({
    runId: config.run.id,
    seed: config.run.seed,
    config: config.buffer,
    segmentBytes: options.segmentBytes,
  });
  const ingest = new Ingest(buffer);
  const batches = new BatchServer(buffer);
  const refill = options.bus ? new RefillCoordinator({ bus: options.bus, prefix: config.nats.subjectPrefix, buffer, ingest }) : undefined;
  let server: RunningServer;
  try {
    server = await startServer(options.address ?? config.buffer.address, config.transport, [
      bind(BufferService, bufferHandlers(buffer, ingest, batches, refill)),
    ]);
  } catch (err) {
    buffer.close();
    throw err;
  }
  refill?.start();
  server.health.set(Serving.SERVING);
  return {
    buffer,
    server,
    refill,
    address: server.address,
    close: async (graceMs) => {
      server.health.set(Serving.NOT_SERVING);
      refill?.close();
      buffer.close();
      await server.close(graceMs);
    },
  };
}
