import { trace } from "@opentelemetry/api";
import type { ProducerConfig } from "../common/config/index.js";
import { inSpan } from "../common/telemetry.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import { type Batch, makeBatch } from "./batch.js";
import type { Context } from "./dataset/pack.js";
import type { Feeds } from "./feeds.js";
import type { InFlightLedger } from "./in-flight.js";
import type { ProduceStep } from "./produce.js";
import type { ProducerProgress } from "./status.js";

/** How long the producer waits for the buffer to answer the chunks in flight when it ends. */
export const FLUSH_MS = 10_000;

const tracer = trace.getTracer("saeflow.producer");

/** What the production loop drives. */
export interface LoopParts {
  id: string;
  producer: ProducerConfig;
  contexts: AsyncGenerator<Context>;
  /** The buffer shards it feeds: a pass starts when every one still fed grants it. */
  feeds: Feeds;
  step: ProduceStep;
  ledger: InFlightLedger;
  progress: ProducerProgress;
  log: (line: string) => void;
}

/** The next pass's contexts, as many as the grant allows (at least one), or undefined once the shard is done. */
async function nextBatch({ producer: p, contexts, feeds }: LoopParts): Promise<Batch | undefined> {
  const picked: Context[] = [];
  const want = Math.max(1, Math.min(p.batchContexts, feeds.contextsAllowed));
  while (picked.length < want) {
    const next = await contexts.next();
    if (next.done) break;
    picked.push(next.value);
  }
  return picked.length ? makeBatch(picked, p.contextLength) : undefined;
}

/**
 * Produces while the gate is open until the shard is done, the run stops or the gate is stopped;
 * PAUSED while parked at the gate. Rejects when a pass fails (the buffer refused the stream for good).
 */
export async function produceUntilDone(parts: LoopParts): Promise<void> {
  const { feeds, progress, producer: p } = parts;
  progress.started();
  // At most two passes in the pipe: one being converted and pushed while the next runs forward.
  let previous: Promise<void> | undefined;
  try {
    for (;;) {
      if (!feeds.open) progress.state = ServiceState.PAUSED;
      if ((await feeds.wait()) === "stop") return;
      progress.state = ServiceState.RUNNING;
      // Named for the stage in every run; `input` says whether it tokenized text or read ids.
      const batch = await inSpan(tracer, "producer.tokenize", { input: p.tokensField ? "ids" : "text" }, async (span) => {
        const b = await nextBatch(parts);
        span.setAttribute("tokens", b?.tokens ?? 0);
        return b;
      });
      if (!batch) {
        await previous;
        parts.log(`${parts.id}: shard ${p.shardIndex}/${p.shardCount} done after ${p.epochs} epoch(s)`);
        // Exhausted only once every chunk is answered; otherwise a restart produces the rest again.
        if (await parts.feeds.drainStreams(FLUSH_MS)) parts.ledger.exhausted();
        return;
      }
      // Counted against the grant when picked, so the next pass is sized by what is left of it.
      feeds.take(batch.rows);
      const current = parts.step.produce(batch);
      current.catch(() => undefined); // awaited below, one pass later
      await previous;
      previous = current;
    }
  } finally {
    if (progress.state !== ServiceState.DRAINING) progress.state = ServiceState.STOPPED;
    // A pass still in the pipe is delivered before the loop ends (its rows count, its position is
    // saved); one that failed fails the loop.
    await previous;
  }
}
