import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { FieldError } from "../common/errors.js";
import { MAX_ID_CHARS } from "../common/grpc/limits.js";
import { wireBuffer } from "../common/grpc/wire.js";
import { linkFrom } from "../common/telemetry.js";
import { type HostArray, toTensor } from "../common/tensor-codec.js";
import { type BatchesRequest, type BatchesResponse, BatchesResponseSchema, ShareMode } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import { DType } from "../gen/saeflow/v1/tensor_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { HookPoint, StreamStats } from "./hook-point.js";
import { Consumers } from "./consumers.js";
import type { Cursor, GatheredIds } from "./pool.js";

const WAIT = -1;

/**
 * The serve side: each trainer stream reads a cursor of its hook point's pool, gathering random
 * minibatches into one preallocated buffer per stream (the adapter resumes the stream only once
 * the last batch is serialised, so the buffer is free again). Fan-out trainers each get a cursor
 * (every row); trainers of a split group share one (disjoint rows). Distinct groups never compete
 * for rows.
 */
export class BatchServer {
  /** Who reads each pool; a trainer whose stream broke keeps its place for a while (consumers.ts). */
  readonly consumers: Consumers;

  constructor(private readonly buffer: ActivationBuffer) {
    this.consumers = new Consumers(buffer.config.defaultShare, buffer.config.trainerAwayMs);
  }

  /** Batches until max_batches are sent, the buffer drains or stops, or `signal` aborts. */
  async *serve(request: BatchesRequest, signal: AbortSignal): AsyncGenerator<BatchesResponse> {
    const hook = this.buffer.hooks.get(request.hookPoint);
    if (!hook) throw new FieldError("hook_point", this.buffer.notHeld(request.hookPoint));
    const { capacity, rowBytes, dModel } = hook.pool;
    // The batch buffer is allocated once per stream: the pool's capacity bounds it.
    if (request.batchSize < 1 || request.batchSize > capacity) {
      throw new FieldError("batch_size", `${request.batchSize} is outside 1..${capacity} (the pool capacity)`);
    }
    if (!request.trainerId) throw new FieldError("trainer_id", "empty");
    for (const [field, id] of [
      ["trainer_id", request.trainerId],
      ["group", request.group],
    ] as const) {
      if (id.length > MAX_ID_CHARS) throw new FieldError(field, `${id.length} characters; at most ${MAX_ID_CHARS}`);
    }
    if (!(request.share in ShareMode))
      throw new FieldError("share", `${request.share} is not a ShareMode (0 unspecified, 1 fan-out, 2 split)`);
    const group = request.group || "default";
    const cursor = this.consumers.attach(hook, group, request.share, request.trainerId);
    const stats: StreamStats = { trainerId: request.trainerId, group, batches: 0, rows: 0, waitMs: 0 };
    hook.streams.add(stats);
    try {
      // Room in front for the other fields, so gRPC sends the batch from this buffer without a copy.
      const out = wireBuffer(request.batchSize * rowBytes, 4096 + (request.includeIds ? request.batchSize * 32 : 0));
      const attributes = { hook_point: hook.name, trainer_id: request.trainerId, group };
      for (let sequence = 0; request.maxBatches === 0n || sequence < request.maxBatches; sequence++) {
        const started = performance.now();
        let rows = this.ready(hook, cursor, request.batchSize);
        while (rows === WAIT) {
          await hook.rowsAdded.wait(signal);
          rows = signal.aborted ? 0 : this.ready(hook, cursor, request.batchSize);
        }
        if (rows === 0) return;
        // No await from here to take(): the rows counted ready are still unread (a split group shares the cursor).
        const waitMs = performance.now() - started;
        stats.waitMs += waitMs;
        hook.recordWait(waitMs);
        const span = this.buffer.instruments.tracer.startSpan("buffer.batch", { attributes });
        const ids: GatheredIds | undefined = request.includeIds ? { rowIds: [], tokenIds: [], contextIds: [] } : undefined;
        const batch = hook.take(cursor, rows, out, ids);
        // The ledger says these rows were served before the trainer can have them.
        this.buffer.commit();
        const link = linkFrom(batch.traceparent);
        if (link) span.addLink(link);
        stats.batches++;
        stats.rows += rows;
        span.setAttributes({
          sequence,
          rows,
          bytes: rows * rowBytes,
          distinct_contexts: batch.distinctContexts,
          wait_ms: waitMs,
          fill_cycle: batch.cycle,
        });
        span.end();
        yield create(BatchesResponseSchema, {
          activations: toTensor(hostView(out, this.buffer.dtype, rows * dModel), this.buffer.dtype, [rows, dModel]),
          sequence: BigInt(sequence),
          fillCycle: BigInt(batch.cycle),
          distinctContexts: batch.distinctContexts,
          waitMs,
          traceparent: batch.traceparent,
          ...ids,
        });
      }
    } finally {
      hook.streams.delete(stats);
      // Cut off while the buffer runs on: the trainer may come back for its place.
      const broken = signal.aborted && !this.buffer.closedToPushes;
      this.consumers.detach(hook, group, request.trainerId, cursor, broken);
    }
  }

  /**
   * Rows `cursor` may take now, 0 when the stream should end, or WAIT. Running, a batch is drawn once
   * the pool was first full and only while at least `floorRows` rows are unread, so it is a random
   * draw from a well-mixed pool; draining, what is left is served.
   */
  private ready(hook: HookPoint, cursor: Cursor, batchSize: number): number {
    const unread = hook.pool.unread(cursor);
    switch (this.buffer.state) {
      case ServiceState.STOPPED:
        if (this.buffer.stoppedBecause !== "closed") return 0;
        // Not the run's end: this buffer is going away, and the trainer should reconnect to the next.
        throw new FieldError("buffer", "stopping without a drain (a restart or an eviction); reconnect", status.UNAVAILABLE);
      case ServiceState.DRAINING:
        return Math.min(unread, batchSize);
      case ServiceState.RUNNING:
        return hook.primed && unread >= Math.max(batchSize, hook.floorRows) ? batchSize : WAIT;
      default:
        return WAIT;
    }
  }
}

/** The first `elements` elements of `out` as the typed array toTensor expects for `dtype`. */
function hostView(out: Buffer, dtype: DType, elements: number): HostArray {
  return dtype === DType.FP32
    ? new Float32Array(out.buffer, out.byteOffset, elements)
    : new Uint16Array(out.buffer, out.byteOffset, elements);
}
