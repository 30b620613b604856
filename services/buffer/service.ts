import { create } from "@bufbuild/protobuf";
import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { BufferService, PushResponseSchema, type StatusResponse } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { Ingest } from "./ingest.js";
import type { BatchServer } from "./serve.js";

/** BufferService: Push and Batches for producers and trainers, Status/Pause/Resume/Drain for operators. */
export function bufferHandlers(
  buffer: ActivationBuffer,
  ingest: Ingest,
  batches: BatchServer,
  status: () => StatusResponse,
): ServiceHandlers<typeof BufferService> {
  return {
    // One chunk at a time: the next is read only once this one is answered, so a full pool holds the
    // producer back through flow control. A producer that cancels gets no answer, but rows already
    // pooled stay pooled (a re-send is a duplicate).
    push: async function* (requests) {
      for await (const request of requests) yield create(PushResponseSchema, await ingest.push(request));
    },
    batches: (request, ctx) => batches.serve(request, ctx.signal),
    status: async () => status(),
    pause: async () => ({ state: buffer.pause() }),
    resume: async () => ({ state: buffer.resume() }),
    drain: async () => {
      const state = buffer.drain();
      return { state, unconsumedRows: BigInt([...buffer.hooks.values()].reduce((sum, h) => sum + h.pool.held, 0)) };
    },
  };
}
