import { parentPort, workerData } from "node:worker_threads";
import { ConfigError } from "../common/config/index.js";
import { createClient } from "../common/grpc/adapter.js";
import { Signal } from "../common/signal.js";
import { decodeFloats, dtypeFromName } from "../common/tensor-codec.js";
import { BufferService } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { type Batch, GrpcBatchSource } from "./batches.js";
import type { FromWorker, PrefetchInit, ToWorker, WireError } from "./prefetch.js";

/**
 * The trainer's batch stream, on its own thread: receives and decodes the buffer's batches, widens
 * 16-bit rows when the step wants float32, and hands each over (its memory transferred, not copied) while
 * the training thread is inside a step. At most `depth` batches wait on the training thread; the
 * stream itself holds one more, so gRPC flow control holds the buffer back beyond that.
 */
const { config, widen, depth } = workerData as PrefetchInit;
const port = parentPort!;
const client = createClient(BufferService, config.trainer.bufferAddress, config.transport);
const source = new GrpcBatchSource(client, config, 1);
const changed = new Signal();
let credit = depth;
let closing = false;

port.on("message", (m: ToWorker) => {
  if (m.type === "credit") credit++;
  else closing = true;
  if (closing) source.close();
  changed.notify();
});

/** The batch in memory this thread owns, so it can be transferred: a copy, or the widened rows. */
function own(batch: Batch): Batch {
  if (widen.includes(batch.dtype)) return { ...batch, dtype: "fp32", data: decodeFloats(batch.data, dtypeFromName(batch.dtype)) };
  return { ...batch, data: batch.data.slice() };
}

function wire(err: unknown): WireError {
  if (err instanceof ConfigError && err.issues.length === 1)
    return { message: err.message, key: err.issues[0]!.key, rawMessage: err.issues[0]!.message };
  const { message, code } = err as Error & { code?: unknown };
  return { message, ...(typeof code === "number" ? { code } : {}) };
}

const send = (m: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);

try {
  for (;;) {
    await changed.until(() => credit > 0 || closing);
    if (closing) break;
    const batch = await source.next();
    if (!batch) break;
    const owned = own(batch);
    credit--;
    send({ type: "batch", batch: owned }, [owned.data.buffer as ArrayBuffer]);
  }
  send({ type: "end" });
} catch (err) {
  send({ type: "error", error: wire(err) });
} finally {
  source.close();
  client.close();
  port.close();
}
