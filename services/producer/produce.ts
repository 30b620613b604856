import { create } from "@bufbuild/protobuf";
import { trace } from "@opentelemetry/api";
import type { RunConfig } from "../common/config/index.js";
import { keepaliveTimeoutMs } from "../common/grpc/options.js";
import { inSpan, traceparentOf } from "../common/telemetry.js";
import { dtypeFromName, type HostArray, toTensor } from "../common/tensor-codec.js";
import { type ActivationChunk, ActivationChunkSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { DType } from "../gen/saeflow/v1/tensor_pb.js";
import type { Batch } from "./batch.js";
import { gatherRows } from "./convert.js";
import type { Position } from "./dataset/position.js";
import type { Feeds } from "./feeds.js";
import type { InFlightLedger } from "./in-flight.js";
import type { ModelSession } from "./session.js";
import type { ProducerProgress } from "./status.js";

const tracer = trace.getTracer("saeflow.producer");

/** What one produce step works with. */
export interface ProduceParts {
  config: RunConfig;
  id: string;
  model: ModelSession;
  /** The buffer shards it pushes to, each with its gate. */
  feeds: Feeds;
  ledger: InFlightLedger;
  progress: ProducerProgress;
  log: (line: string) => void;
}

/**
 * What to tell the user when a pass held the producer's own thread (the CPU provider) past the gRPC
 * keepalive timeout: meanwhile it could not answer the buffer's keepalive pings, so the buffer may
 * have closed the connection. Undefined when the pass was shorter.
 */
export function longPassWarning(passMs: number, config: RunConfig): string | undefined {
  const limit = keepaliveTimeoutMs(config.transport);
  if (passMs <= limit) return undefined;
  return (
    `a forward pass held the producer's thread for ${(passMs / 1000).toFixed(1)} s, longer than the gRPC keepalive ` +
    `timeout (${(limit / 1000).toFixed(1)} s, from transport.keepaliveMs): the buffer may close the connection mid-pass ` +
    `(chunks in flight are sent again, none is lost); lower producer.batchContexts or raise transport.keepaliveMs`
  );
}

/**
 * One batch through the producer: a forward pass computing every hook tensor, their kept rows in
 * the wire dtype, one chunk per hook point (sequences counted per hook point, carried across
 * restarts by the saved position), pushed to the buffer shard holding it. Hook points whose shard
 * ended are left out. Each stage is a span.
 */
export class ProduceStep {
  private readonly hooks: readonly string[];
  private readonly dtype: DType;
  private readonly nextSequence: Map<string, number>;
  /** Rows per hook point and tokens of every pass so far, the saved ones included. */
  private readonly produced: Position["produced"];
  private readonly lineage: string;
  private warnedLongPass = false;
  /** Settles once the last batch handed to produce() is pushed (or failed). */
  private delivered: Promise<void> = Promise.resolve();

  constructor(
    private readonly parts: ProduceParts,
    from: Position,
  ) {
    this.hooks = parts.config.producer.hookPoints;
    this.dtype = dtypeFromName(parts.config.producer.dtype);
    this.nextSequence = new Map(this.hooks.map((h) => [h, from.nextSequence[h] ?? 0]));
    this.produced = { ...from.produced };
    this.lineage = from.lineage;
  }

  /**
   * Produces `batch`. On a GPU provider its forward pass runs on the model's thread while the
   * previous batch is still being converted and pushed; on the CPU provider it runs on this thread,
   * between them (see model-thread.ts). Everything after the forward pass waits for the previous
   * batch, so sequences, positions and pushes stay in order.
   */
  produce(batch: Batch): Promise<void> {
    const attributes = { contexts: batch.contexts.length, tokens: batch.tokens, rows: batch.rows };
    const previous = this.delivered;
    const done = inSpan(tracer, "producer.produce", attributes, async (span) => {
      const { outputs, traceparent } = await this.forward(batch);
      await previous;
      if ((await this.parts.feeds.deliverable()) === "stop") {
        // Not delivered, so the saved position stays before these contexts: a restart produces them again.
        span.setAttribute("dropped_on_stop", true);
        return;
      }
      const hooks = this.hooks.filter((h) => this.parts.feeds.fed(h));
      const arrays = await this.convert(batch, outputs, hooks);
      const chunks = this.chunksOf(batch, arrays, hooks, traceparent);
      const bytes = arrays.reduce((n, a) => n + a.byteLength, 0);
      this.parts.ledger.opened(this.positionAfter(batch), batch.rows === 0 ? [] : chunks);
      if (batch.rows > 0) await this.push(batch, chunks, bytes);
    });
    this.delivered = done.catch(() => undefined);
    return done;
  }

  private forward(batch: Batch) {
    return inSpan(tracer, "producer.forward", { tokens: batch.tokens, contexts: batch.contexts.length }, async (span) => {
      const t0 = performance.now();
      const outputs = await this.parts.model.run(batch.inputs);
      const warning =
        this.parts.model.ownThread || this.warnedLongPass ? undefined : longPassWarning(performance.now() - t0, this.parts.config);
      if (warning) {
        this.warnedLongPass = true;
        this.parts.log(`${this.parts.id}: ${warning}`);
      }
      return { traceparent: traceparentOf(span), outputs };
    });
  }

  private convert(batch: Batch, outputs: Awaited<ReturnType<ModelSession["run"]>>, hooks: readonly string[]): Promise<HostArray[]> {
    const attributes = { tokens: batch.tokens, rows: batch.rows, hook_points: hooks.length };
    return inSpan(tracer, "producer.convert", attributes, async (span) => {
      const out = hooks.map((hook) => gatherRows(outputs.get(hook)!, batch.spans, batch.rows, this.parts.model.dModel, this.dtype));
      span.setAttribute(
        "bytes",
        out.reduce((n, a) => n + a.byteLength, 0),
      );
      return out;
    });
  }

  /** One chunk per hook point, each taking that hook point's next sequence. */
  private chunksOf(batch: Batch, arrays: HostArray[], hooks: readonly string[], traceparent: string): ActivationChunk[] {
    const { config, id, model } = this.parts;
    return hooks.map((hook, h) => {
      const sequence = this.nextSequence.get(hook)!;
      this.nextSequence.set(hook, sequence + 1);
      return create(ActivationChunkSchema, {
        runId: config.run.id,
        hookPoint: hook,
        producerId: id,
        sequence: BigInt(sequence),
        activations: toTensor(arrays[h]!, this.dtype, [batch.rows, model.dModel]),
        tokenIds: batch.tokenIds,
        contextIds: batch.contextIds,
        documentIds: batch.documentIds,
        traceparent,
      });
    });
  }

  /** Where the shard stands once this batch is delivered. */
  private positionAfter(batch: Batch): Position {
    const last = batch.contexts[batch.contexts.length - 1]!;
    this.produced.rows += batch.rows;
    this.produced.tokens += batch.tokens;
    return {
      cursor: last.end,
      documentsDone: last.documentsDone,
      contexts: last.id + 1,
      exhausted: false,
      nextSequence: Object.fromEntries(this.nextSequence),
      lineage: this.lineage,
      produced: { ...this.produced },
    };
  }

  private async push(batch: Batch, chunks: ActivationChunk[], bytes: number): Promise<void> {
    const { feeds, progress } = this.parts;
    await inSpan(tracer, "producer.push", { tokens: batch.tokens, rows: batch.rows * chunks.length, bytes }, async () => {
      for (const chunk of chunks) await feeds.send(chunk);
    });
    feeds.sent(batch.rows);
    progress.sent(batch.tokens, batch.rows, bytes);
  }
}
