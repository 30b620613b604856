import { parentPort, workerData } from "node:worker_threads";
import { status as grpcStatus } from "@grpc/grpc-js";
import { ConfigError } from "../common/config/index.js";
import { createClient } from "../common/grpc/adapter.js";
import { RECONNECT_MAX_MS } from "../common/grpc/options.js";
import { Signal } from "../common/signal.js";
import { decodeFloats, dtypeFromName } from "../common/tensor-codec.js";
import { BufferService } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { type Batch, type BatchSource, GrpcBatchSource } from "./batches.js";
import { wireError } from "../common/worker.js";
import type { FromWorker, PrefetchInit, ToWorker } from "./prefetch.js";

/**
 * The trainer's batch stream, on its own thread: receives and decodes the buffer's batches, widens
 * 16-bit rows when the step wants float32, and hands each over (its memory transferred, not copied) while
 * the training thread is inside a step. At most `depth` batches wait on the training thread; the
 * stream itself holds one more, so gRPC flow control holds the buffer back beyond that.
 *
 * A stream that breaks (the buffer restarted, the network failed) is opened again with backoff for
 * up to buffer.trainerAwayMs, under the same trainer id, so the buffer gives back this trainer's place
 * in its pool; the training thread just waits for its next batch meanwhile, at the same step.
 */
const { config, stream, widen, depth } = workerData as PrefetchInit;
const port = parentPort!;
const client = createClient(BufferService, stream.address, config.transport);
const budgetMs = config.buffer.trainerAwayMs;
let source: BatchSource = new GrpcBatchSource(client, config, 1, stream);
const changed = new Signal();
let credit = depth;
let closing = false;

/** Statuses a new stream may cure: the buffer went away or the connection failed. */
const TRANSIENT = new Set<number>([
  grpcStatus.UNAVAILABLE,
  grpcStatus.CANCELLED,
  grpcStatus.UNKNOWN,
  grpcStatus.INTERNAL,
  grpcStatus.DEADLINE_EXCEEDED,
  grpcStatus.ABORTED,
]);
const MIN_BACKOFF_MS = 200;

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

const send = (m: FromWorker, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);
const log = (line: string) => send({ type: "log", line });
const transient = (err: unknown) => !(err instanceof ConfigError) && TRANSIENT.has((err as { code?: number }).code ?? -1);

/**
 * Opens the stream again after `err` broke it, retrying with backoff until a new stream is open and
 * the channel is up; throws once buffer.trainerAwayMs has passed since `lostAt`, or with the error
 * when it is not one a new stream can cure.
 */
async function reopen(err: unknown, lostAt: number): Promise<void> {
  let last = err;
  for (let backoff = MIN_BACKOFF_MS; ; backoff = Math.min(backoff * 2, RECONNECT_MAX_MS)) {
    if (!transient(last)) throw last;
    const away = Date.now() - lostAt;
    if (away >= budgetMs) {
      throw new Error(
        `the buffer at ${stream.address} gave no ${stream.hookPoint} batch for ${(away / 1000).toFixed(0)} s (buffer.trainerAwayMs is ${budgetMs}); last: ${(last as Error).message}`,
      );
    }
    await changed.wait(undefined, backoff);
    if (closing) return;
    try {
      await client.ready(Math.min(RECONNECT_MAX_MS, budgetMs - away));
      source = new GrpcBatchSource(client, config, 1, stream);
      return;
    } catch (e) {
      last = Object.assign(new Error((e as Error).message), { code: grpcStatus.UNAVAILABLE });
    }
  }
}

/** The next batch, riding through broken streams; undefined once the stream ended or this thread is closing. */
async function next(): Promise<Batch | undefined> {
  let lostAt: number | undefined;
  for (;;) {
    try {
      const batch = await source.next();
      if (lostAt !== undefined && batch)
        log(`stream of ${stream.hookPoint} from the buffer at ${stream.address} back after ${Date.now() - lostAt} ms; training goes on`);
      return batch;
    } catch (err) {
      if (closing) return undefined;
      source.close();
      if (lostAt === undefined) {
        lostAt = Date.now();
        log(
          `stream of ${stream.hookPoint} from the buffer at ${stream.address} lost (${(err as Error).message}); reconnecting for up to ${budgetMs / 1000} s`,
        );
      }
      await reopen(err, lostAt);
      if (closing) return undefined;
    }
  }
}

try {
  for (;;) {
    await changed.until(() => credit > 0 || closing);
    if (closing) break;
    const batch = await next();
    if (!batch) break;
    const owned = own(batch);
    credit--;
    send({ type: "batch", batch: owned }, [owned.data.buffer as ArrayBuffer]);
  }
  send({ type: "end" });
} catch (err) {
  send({ type: "error", error: wireError(err) });
} finally {
  source.close();
  client.close();
  port.close();
}
