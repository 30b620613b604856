import { appendFileSync } from "node:fs";
import { SingleBar } from "cli-progress";
import type { HookPointStatus } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import type { RunStatus } from "./status.js";

/**
 * The live progress line of `saeflow up` and the pipeline.jsonl it leaves: one record per poll with
 * tokens, throughput, loss, L0, buffer fill and trainer wait, for the report's time-series plots.
 */
export interface PipelineRecord {
  t: number;
  elapsedS: number;
  step: number;
  steps: number;
  producerTokens: number;
  producerTokensPerS: number;
  trainerTokens: number;
  trainerTokensPerS: number;
  loss: number;
  l0: number;
  explainedVariance: number;
  bufferFill: number;
  bufferRowsIn: number;
  bufferRowsOut: number;
  /** Time the trainers waited for a batch, over their wall time (the trainers' own count). */
  trainerWaitFraction: number;
  bufferHoldFraction: number;
  refillCycles: number;
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const mean = (xs: number[]) => (xs.length ? sum(xs) / xs.length : NaN);

export function summarise(st: RunStatus, startedAt: number, steps: number): PipelineRecord {
  const hooks = st.buffer.flatMap((b) => b.status?.hookPoints ?? []);
  const trainers = st.trainers.flatMap((t) => (t.status ? [t.status] : []));
  const saes = trainers.flatMap((t) => t.saes);
  const wall = sum(trainers.map((t) => t.wallMs));
  return {
    t: st.at,
    elapsedS: (st.at - startedAt) / 1000,
    step: saes.length ? Math.min(...saes.map((s) => Number(s.step))) : 0,
    steps,
    producerTokens: sum(st.producers.map((p) => Number(p.status?.tokens ?? 0n))),
    producerTokensPerS: sum(st.producers.map((p) => p.status?.tokensPerSecond ?? 0)),
    trainerTokens: sum(trainers.map((t) => Number(t.saes[0]?.tokens ?? 0n))),
    trainerTokensPerS: sum(trainers.map((t) => t.saes[0]?.tokensPerSecond ?? 0)),
    loss: mean(saes.map((s) => s.loss)),
    l0: mean(saes.map((s) => s.l0)),
    explainedVariance: mean(saes.map((s) => s.explainedVariance)),
    bufferFill: mean(hooks.map((h) => h.fillFraction)),
    bufferRowsIn: sum(hooks.map((h) => Number(h.rowsIn))),
    bufferRowsOut: sum(hooks.map((h) => Number(h.rowsOut))),
    trainerWaitFraction: wall > 0 ? sum(trainers.map((t) => t.waitMs)) / wall : 0,
    bufferHoldFraction: holdFraction(hooks, st.at - startedAt),
    refillCycles: sum(hooks.map((h) => Number(h.refillCycles))),
  };
}

/**
 * Time the buffer held a trainer's next batch back for producers, as a fraction of wall time. It
 * differs from the trainer's own wait: a trainer's gRPC stream prefetches, so the buffer may hold the
 * next batch while the trainer is still busy with the last one, and the trainer never notices.
 */
function holdFraction(hooks: HookPointStatus[], elapsedMs: number): number {
  const streams = Math.max(1, sum(hooks.map((h) => h.trainers.length)));
  return sum(hooks.map((h) => h.trainerWaitMs)) / streams / Math.max(1, elapsedMs);
}

const si = (x: number) => (x >= 1e6 ? `${(x / 1e6).toFixed(2)}M` : x >= 1e3 ? `${(x / 1e3).toFixed(1)}k` : x.toFixed(0));

const FORMAT = "step {value}/{total} | {tokens} tok | {tps} tok/s | loss {loss} | L0 {l0} | buffer {fill} | trainer wait {wait}";

export class ProgressLine {
  private readonly bar: SingleBar;
  private started = false;
  private lastPlain = 0;
  /** Without a terminal (CI, logs) a plain line every 10 s replaces the redrawn bar. */
  private readonly tty = Boolean(process.stderr.isTTY);

  constructor(private readonly pipelineFile: string) {
    this.bar = new SingleBar({ format: `{bar} ${FORMAT}`, barsize: 20, hideCursor: true, etaBuffer: 20 });
  }

  update(r: PipelineRecord): void {
    appendFileSync(this.pipelineFile, `${JSON.stringify(r)}\n`);
    const payload = {
      tokens: si(r.trainerTokens),
      tps: si(r.trainerTokensPerS),
      loss: Number.isFinite(r.loss) ? r.loss.toFixed(4) : "-",
      l0: Number.isFinite(r.l0) ? r.l0.toFixed(1) : "-",
      fill: `${(r.bufferFill * 100).toFixed(0)}%`,
      wait: `${(r.trainerWaitFraction * 100).toFixed(0)}%`,
    };
    if (!this.tty) {
      if (r.t - this.lastPlain < 10_000 && r.step < r.steps) return;
      this.lastPlain = r.t;
      const line = Object.entries({ value: r.step, total: r.steps, ...payload }).reduce(
        (text, [k, v]) => text.replace(`{${k}}`, String(v)),
        FORMAT,
      );
      process.stderr.write(`${line}\n`);
      return;
    }
    if (!this.started) {
      this.bar.start(r.steps, r.step, payload);
      this.started = true;
    } else this.bar.update(r.step, payload);
  }

  stop(): void {
    if (this.started) this.bar.stop();
  }
}
