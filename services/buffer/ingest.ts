import type { MessageInitShape } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { context, type Context, trace } from "@opentelemetry/api";
import { FieldError } from "../common/errors.js";
import { DEFAULT_LIMITS, type LimitsConfig, MAX_ID_CHARS, quoted } from "../common/grpc/limits.js";
import { inSpan, linkFrom } from "../common/telemetry.js";
import { checkTensor, firstNonFinite } from "../common/tensor-codec.js";
import type { ActivationChunk, PushRequest, PushResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { RefusalReason } from "./accounting.js";
import type { HookPoint } from "./hook-point.js";
import { ChunkRowNames } from "./marks.js";
import type { ChunkRows } from "./pool.js";

export type PushResponseInit = MessageInitShape<typeof PushResponseSchema>;

interface Outcome {
  placed: number;
  dropped: number;
  code: status;
  message: string;
}

/**
 * The push side: checks each chunk, drops the rows it already has (by the marks, see marks.ts), and
 * copies the rest into free slots. A chunk that finds the pool full waits for trainers to free rows,
 * holding its stream, so gRPC flow control stops the producer when NATS demand came too late. Every
 * answer is committed to the ledger (buffer.stateFile) before it is sent.
 */
export class Ingest {
  constructor(
    private readonly buffer: ActivationBuffer,
    private readonly limits: Pick<LimitsConfig, "producers"> = DEFAULT_LIMITS,
  ) {}

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

  /**
   * Checks a chunk's ids, shape and counts against its pool before anything about it is kept;
   * returns the pool and the row count. Strings a client sent are quoted cut short in the answer.
   */
  private check(chunk: ActivationChunk | undefined): [HookPoint, number] {
    if (!chunk) throw new FieldError("chunk", "missing");
    const hook = this.buffer.hooks.get(chunk.hookPoint);
    if (!hook) throw new FieldError("chunk.hook_point", this.buffer.notHeld(chunk.hookPoint));
    const producer = chunk.producerId;
    if (!producer) throw new FieldError("chunk.producer_id", "empty");
    if (producer.length > MAX_ID_CHARS) throw new FieldError("chunk.producer_id", `${producer.length} characters; at most ${MAX_ID_CHARS}`);
    // Sequences are kept as numbers: past 2^53 two chunks would share one.
    if (chunk.sequence > BigInt(Number.MAX_SAFE_INTEGER)) throw new FieldError("chunk.sequence", `${chunk.sequence} is past 2^53 - 1`);
    checkTensor(chunk.activations, "chunk.activations", { dtype: this.buffer.dtype, shape: [undefined, hook.pool.dModel] });
    const rows = chunk.activations!.shape[0]!;
    if (rows === 0) throw new FieldError("chunk.activations.shape", "dimension 0 is 0; a chunk holds at least one row");
    if (chunk.contextIds.length !== rows)
      throw new FieldError("chunk.context_ids", `${chunk.contextIds.length} ids for ${rows} rows; one per row`);
    const back = chunk.contextIds.findIndex((id, i) => i > 0 && id < chunk.contextIds[i - 1]!);
    if (back > 0) {
      throw new FieldError(
        "chunk.context_ids",
        `id ${back} (${chunk.contextIds[back]}) is below the one before it; a chunk holds whole contexts in order`,
      );
    }
    if (chunk.tokenIds.length !== 0 && chunk.tokenIds.length !== rows) {
      throw new FieldError("chunk.token_ids", `${chunk.tokenIds.length} ids for ${rows} rows; none or one per row`);
    }
    if (chunk.documentIds.length !== 0 && chunk.documentIds.length !== rows) {
      throw new FieldError("chunk.document_ids", `${chunk.documentIds.length} ids for ${rows} rows; none or one per row`);
    }
    // Each producer id is kept (its marks), so a run takes at most transport.limits.producers of them.
    const { marks } = this.buffer;
    if (!marks.has(producer) && marks.size >= this.limits.producers) {
      throw new FieldError(
        "chunk.producer_id",
        `${quoted(producer)} would be producer ${marks.size + 1} of this run; transport.limits.producers is ${this.limits.producers}`,
        status.RESOURCE_EXHAUSTED,
      );
    }
    return [hook, rows];
  }

  /** Places the rows of a checked chunk; the answer is in the ledger (and its state file) once this returns. */
  private async accept(chunk: ActivationChunk, hook: HookPoint, rows: number): Promise<Outcome> {
    const names = new ChunkRowNames(chunk.contextIds);
    const { marks } = this.buffer;
    // Every row counts against the producer's grant, duplicates too: it counted them as sent.
    this.buffer.received(chunk.producerId, hook.name, rows);
    const skip = marks.duplicates(chunk.producerId, hook.name, names);
    hook.accounting.drop("duplicate", skip);
    const end = names.after(rows - 1);
    if (skip < rows) marks.claim(chunk.producerId, hook.name, end);
    const outcome =
      skip === rows ? { placed: 0, dropped: rows, code: status.OK, message: "" } : await this.place(chunk, hook, rows, skip, names);
    marks.commit(chunk.producerId, hook.name, end);
    this.buffer.commit();
    return outcome;
  }

  /** Pools rows [skip, rows) of a chunk, or refuses them for a reason. */
  private async place(chunk: ActivationChunk, hook: HookPoint, rows: number, skip: number, names: ChunkRowNames): Promise<Outcome> {
    if (this.buffer.closedToPushes) {
      return this.dropRest(hook, skip, skip, rows, "draining", status.FAILED_PRECONDITION, "buffer is draining: the chunk was not pooled");
    }
    if (hook.readersDone) return this.dropRest(hook, skip, skip, rows, "draining", status.FAILED_PRECONDITION, readersDone(hook));
    const tensor = chunk.activations!;
    if (this.buffer.config.checkFinite) {
      // One bad row refuses the chunk: a NaN in one position of a forward pass makes the rest suspect.
      const bad = firstNonFinite(tensor.data, tensor.dtype);
      if (bad >= 0) {
        const row = Math.floor(bad / hook.pool.dModel);
        const message = `chunk.activations.data: row ${row} holds NaN or Inf; the chunk was refused`;
        return this.dropRest(hook, skip, skip, rows, "non_finite", status.INVALID_ARGUMENT, message);
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
    let placed = skip;
    while (placed < rows) {
      if (this.buffer.closedToPushes) {
        const message = `buffer is draining: ${rows - placed} of ${rows} rows not pooled`;
        return this.dropRest(hook, skip, placed, rows, "draining", status.FAILED_PRECONDITION, message);
      }
      if (hook.readersDone) return this.dropRest(hook, skip, placed, rows, "draining", status.FAILED_PRECONDITION, readersDone(hook));
      const fits = Math.min(hook.pool.free, rows - placed);
      if (fits > 0) {
        source.cycle = hook.cycle;
        hook.add(source, placed, fits, link);
        placed += fits;
        // A ledger saved while the rest waits for room holds the rows placed so far, and so does the mark.
        this.buffer.marks.commit(chunk.producerId, hook.name, names.after(placed - 1));
        continue;
      }
      const left = deadline - performance.now();
      if (left <= 0) {
        const message = `chunk: ${rows - placed} of ${rows} rows dropped: pool full for ${this.buffer.config.pushWaitMs} ms`;
        return this.dropRest(hook, skip, placed, rows, "pool_full", status.RESOURCE_EXHAUSTED, message);
      }
      await hook.spaceFreed.wait(undefined, left);
    }
    return { placed: rows - skip, dropped: skip, code: status.OK, message: "" };
  }

  /** Refuses rows [from, rows) for `reason`; of the rows before, the first `skip` were duplicates and the rest were placed. */
  private dropRest(
    hook: HookPoint,
    skip: number,
    from: number,
    rows: number,
    reason: RefusalReason,
    code: status,
    message: string,
  ): Outcome {
    hook.accounting.drop(reason, rows - from);
    return { placed: from - skip, dropped: skip + rows - from, code, message };
  }
}

const readersDone = (hook: HookPoint) =>
  `${hook.name}: every trainer reading this pool is done; the rows were not pooled (the producer may go on feeding the other pools)`;

/** The producer span that made a chunk becomes the parent of its push span. */
function parentOf(traceparent: string): Context {
  const link = linkFrom(traceparent);
  return link ? trace.setSpanContext(context.active(), link.context) : context.active();
}
