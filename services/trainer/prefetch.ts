import type { Worker } from "node:worker_threads";
import type { RunConfig } from "../common/config/index.js";
import type { DTypeName } from "../common/config/sections/dtype.js";
import { Signal } from "../common/signal.js";
import { startWorker, unwireError, type WireError } from "../common/worker.js";
import type { Batch, BatchSource, StreamOf } from "./batches.js";

/** What the prefetch thread is started with. */
export interface PrefetchInit {
  config: RunConfig;
  /** The hook point and the buffer shard streamed from. */
  stream: StreamOf;
  /** Batch dtypes widened to float32 there (the step takes float32) rather than handed over as raw words. */
  widen: DTypeName[];
  /** Batches that may wait, ready, on the training thread. */
  depth: number;
}

export type FromWorker =
  { type: "batch"; batch: Batch } | { type: "end" } | { type: "error"; error: WireError } | { type: "log"; line: string };
export type ToWorker = { type: "credit" } | { type: "close" };

/**
 * One buffer shard's batches of one hook point, received on a thread of their own (prefetch-worker.ts)
 * so that the next batch is received, decoded and converted while the training thread runs a step:
 * onnxruntime-node runs a session on the thread that calls it, so nothing else happens on that
 * thread meanwhile.
 */
export class PrefetchedBatches implements BatchSource {
  private readonly worker: Worker;
  private readonly queue: Batch[] = [];
  private readonly changed = new Signal();
  private failure: Error | undefined;
  private ended = false;
  private closed = false;

  /** `log` hears what the stream's thread says (a broken stream, its reconnection). */
  constructor(config: RunConfig, stream: StreamOf, widen: DTypeName[], depth = 1, log: (line: string) => void = () => undefined) {
    const init: PrefetchInit = { config, stream, widen, depth };
    this.worker = startWorker(import.meta.url, "prefetch-worker", init);
    this.worker.on("message", (m: FromWorker) => {
      if (m.type === "log") return log(m.line);
      if (m.type === "batch") this.queue.push(m.batch);
      else if (m.type === "error") this.failure ??= unwireError(m.error);
      else this.ended = true;
      this.changed.notify();
    });
    this.worker.on("error", (err) => {
      this.failure ??= err;
      this.changed.notify();
    });
    this.worker.on("exit", () => {
      this.ended = true;
      this.changed.notify();
    });
  }

  /** Batches received and ready, waiting for next(). */
  get waiting(): number {
    return this.queue.length;
  }

  async next(): Promise<Batch | undefined> {
    await this.changed.until(() => this.queue.length > 0 || this.ended || this.failure !== undefined || this.closed);
    const batch = this.closed ? undefined : this.queue.shift();
    if (batch) {
      this.worker.postMessage({ type: "credit" } satisfies ToWorker);
      return batch;
    }
    if (this.failure && !this.closed) throw this.failure;
    return undefined;
  }

  /** Ends the stream: the thread cancels its call and exits; one that does not within 5 s is stopped. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.changed.notify();
    this.worker.postMessage({ type: "close" } satisfies ToWorker);
    this.worker.unref();
    setTimeout(() => void this.worker.terminate(), 5000).unref();
  }
}
