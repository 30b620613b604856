import type { MessageInitShape } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { context, type Context, trace } from "@opentelemetry/api";
import { FieldError } from "../common/errors.js";
import { inSpan, linkFrom } from "../common/telemetry.js";
import { checkTensor, firstNonFinite } from "../common/tensor-codec.js";
import type { ActivationChunk, PushRequest, PushResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { DropReason } from "./accounting.js";
import type { HookPoint } from "./hook-point.js";
import type { ChunkRows } from "./pool.js";

export type PushResponseInit = MessageInitShape<typeof PushResponseSchema>;

/**
 * Sequences of one (producer, hook point) seen so far: everything below `next`, plus any seen out of
 * order. Counting starts at the first sequence seen, since a producer that rejoins keeps numbering.
 */
class Sequences {
  private next: number | undefined;
  private readonly ahead = new Set<number>();

  has(sequence: number): boolean {
    return (this.next !== undefined && sequence < this.next) || this.ahead.has(sequence);
  }

  add(sequence: number): void {
    if (this.next !== undefined && sequence !== this.next) {
      this.ahead.add(sequence);
      return;
    }
    this.next = sequence + 1;
    while (this.ahead.delete(this.next)) this.next++;
  }
}

interface Outcome {
  placed: number;
  dropped: number;
  code: status;
  message: string;
}

/**
 * The push side: checks each chunk, drops duplicates, and copies the rows into free slots. A chunk
 * that finds the pool full waits for trainers to free rows, holding its stream, so gRPC flow
 * control stops the producer when NATS demand came too late.
 */
export class Ingest {
  /** producer id -> hook point -> sequences seen. */
  private readonly seen = new Map<string, Map<string, Sequences>>();

  constructor(private readonly buffer: ActivationBuffer) {}

  /** Forgets what `producerId` sent: it (re)joined and numbers its chunks from 0 again. */
  forget(producerId: string): void {
    this.seen.delete(producerId);
  }

  /**
   * Answers one pushed chunk. Problems with the chunk are answered in the response; a chunk for
   * another run throws (FAILED_PRECONDITION), which ends the stream: every later chunk is as wrong.
   */
  async push(request: PushRequest): Promise<PushResponseInit> {
    const chunk = request.chunk;
    if (chunk && chunk.runId !== this.buffer.runId) {
      throw new FieldError("chunk.run_id", `"${chunk.runId}" is not this buffer's run "${this.buffer.runId}"`, status.FAILED_PRECONDITION);
    }
    const answer = { hookPoint: chunk?.hookPoint ?? "", sequence: chunk?.sequence ?? 0n };
    let hook: HookPoint;
    let rows: number;
    try {
      [hook, rows] = this.check(chunk);
    } catch (err) {
      if (!(err instanceof FieldError)) throw err;
      this.buffer.instruments.chunksRefused.add(1, { field: err.field });
      return { ...answer, code: err.code, message: err.message };
    }
    const valid = chunk!;
    return context.with(parentOf(valid.traceparent), () =>
      inSpan(
        this.buffer.instruments.tracer,
        "buffer.push",
        {
          hook_point: hook.name,
          producer_id: valid.producerId,
          sequence: Number(valid.sequence),
          rows,
          bytes: valid.activations!.data.byteLength,
        },
        async (span) => {
          const outcome = await this.accept(valid, hook, rows);
          span.setAttributes({ rows_accepted: outcome.placed, rows_dropped: outcome.dropped, code: outcome.code });
          const { placed, dropped, code, message } = outcome;
          return { ...answer, code, message, rowsAccepted: placed, rowsDropped: dropped, freeRows: BigInt(hook.pool.free) };
        },
      ),
    );
  }

  /** Checks a chunk's shape and ids against its pool; returns the pool and the row count. */
  private check(chunk: ActivationChunk | undefined): [HookPoint, number] {
    if (!chunk) throw new FieldError("chunk", "missing");
    const hook = this.buffer.hooks.get(chunk.hookPoint);
    if (!hook) {
      throw new FieldError(
        "chunk.hook_point",
        `unknown hook point "${chunk.hookPoint}"; this buffer holds ${[...this.buffer.hooks.keys()].join(", ")}`,
      );
    }
    if (!chunk.producerId) throw new FieldError("chunk.producer_id", "empty");
    checkTensor(chunk.activations, "chunk.activations", { dtype: this.buffer.dtype, shape: [undefined, hook.pool.dModel] });
    const rows = chunk.activations!.shape[0]!;
    if (rows === 0) throw new FieldError("chunk.activations.shape", "dimension 0 is 0; a chunk holds at least one row");
    if (chunk.contextIds.length !== rows)
      throw new FieldError("chunk.context_ids", `${chunk.contextIds.length} ids for ${rows} rows; one per row`);
    if (chunk.tokenIds.length !== 0 && chunk.tokenIds.length !== rows) {
      throw new FieldError("chunk.token_ids", `${chunk.tokenIds.length} ids for ${rows} rows; none or one per row`);
    }
    if (chunk.documentIds.length !== 0 && chunk.documentIds.length !== rows) {
      throw new FieldError("chunk.document_ids", `${chunk.documentIds.length} ids for ${rows} rows; none or one per row`);
    }
    return [hook, rows];
  }

  private async accept(chunk: ActivationChunk, hook: HookPoint, rows: number): Promise<Outcome> {
    const sequences = this.sequencesOf(chunk.producerId, hook.name);
    const sequence = Number(chunk.sequence);
    if (sequences.has(sequence)) return this.dropRest(hook, 0, rows, "duplicate", status.OK, "");
    sequences.add(sequence);
    this.buffer.received(chunk.producerId, hook.name, rows);
    if (this.buffer.closedToPushes) {
      return this.dropRest(hook, 0, rows, "draining", status.FAILED_PRECONDITION, "buffer is draining: the chunk was not pooled");
    }
    const tensor = chunk.activations!;
    if (this.buffer.config.checkFinite) {
      // One bad row refuses the chunk: a NaN in one position of a forward pass makes the rest suspect.
      const bad = firstNonFinite(tensor.data, tensor.dtype);
      if (bad >= 0) {
        const row = Math.floor(bad / hook.pool.dModel);
        const message = `chunk.activations.data: row ${row} holds NaN or Inf; the chunk was refused`;
        return this.dropRest(hook, 0, rows, "non_finite", status.INVALID_ARGUMENT, message);
      }
    }
    const source: ChunkRows = {
      data: Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength),
      tokenIds: chunk.tokenIds,
      contextIds: chunk.contextIds,
      contextBase: this.buffer.contextBase(chunk.producerId),
      firstRowId: this.buffer.claimRowIds(rows),
      cycle: hook.cycle,
    };
    const link = linkFrom(chunk.traceparent);
    const deadline = performance.now() + this.buffer.config.pushWaitMs;
    let placed = 0;
    while (placed < rows) {
      if (this.buffer.closedToPushes) {
        return this.dropRest(
          hook,
          placed,
          rows,
          "draining",
          status.FAILED_PRECONDITION,
          `buffer is draining: ${rows - placed} of ${rows} rows not pooled`,
        );
      }
      const fits = Math.min(hook.pool.free, rows - placed);
      if (fits > 0) {
        source.cycle = hook.cycle;
        hook.add(source, placed, fits, link);
        placed += fits;
        continue;
      }
      const left = deadline - performance.now();
      if (left <= 0) {
        const message = `chunk: ${rows - placed} of ${rows} rows dropped: pool full for ${this.buffer.config.pushWaitMs} ms`;
        return this.dropRest(hook, placed, rows, "pool_full", status.RESOURCE_EXHAUSTED, message);
      }
      await hook.spaceFreed.wait(undefined, left);
    }
    return { placed, dropped: 0, code: status.OK, message: "" };
  }

  private dropRest(hook: HookPoint, placed: number, rows: number, reason: DropReason, code: status, message: string): Outcome {
    hook.accounting.drop(reason, rows - placed);
    return { placed, dropped: rows - placed, code, message };
  }

  private sequencesOf(producerId: string, hookPoint: string): Sequences {
    let byHook = this.seen.get(producerId);
    if (!byHook) this.seen.set(producerId, (byHook = new Map()));
    let sequences = byHook.get(hookPoint);
    if (!sequences) byHook.set(hookPoint, (sequences = new Sequences()));
    return sequences;
  }
}

/** The producer span that made a chunk becomes the parent of its push span. */
function parentOf(traceparent: string): Context {
  const link = linkFrom(traceparent);
  return link ? trace.setSpanContext(context.active(), link.context) : context.active();
}
