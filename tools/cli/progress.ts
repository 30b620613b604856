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
  /** Time the trainers waited for a batch (or were down) over the last RECENT_MS, so that a stall shows at once. */
  trainerWaitFraction: number;
  bufferHoldFraction: number;
  refillCycles: number;
  /** What is down or unreachable right now (a role restarting, nats-server, a role not answering). */
  down?: string[];
  /** Seconds since the furthest trainer step last moved. */
  stalledS?: number;
}

/** Throughput and trainer wait are measured over this recent window. */
export const RECENT_MS = 5_000;

interface TrainerSample {
  tokens: number;
  waitMs: number;
}

/**
 * Trainer throughput and wait over the last RECENT_MS, from successive status polls, rather than
 * since the start: a run that stalls shows 0 tok/s and 100% wait within one window, not the old
 * figures. Between two polls a trainer that took no step (or did not answer) waited the whole time;
 * one that stepped waited what it says it waited. A trainer whose counters went back (it restarted
 * from a checkpoint) starts a fresh baseline.
 */
export class RecentWindow {
  private readonly samples: Array<{ t: number; trainers: Map<string, TrainerSample> }> = [];
  private furthest = -1;
  private movedAt = 0;

  observe(st: RunStatus, step: number): { tokensPerS: number; waitFraction: number; stalledS: number } {
    const trainers = new Map<string, TrainerSample>();
    for (const t of st.trainers) {
      if (t.status) trainers.set(t.id, { tokens: Number(t.status.saes[0]?.tokens ?? 0n), waitMs: t.status.waitMs });
    }
    this.samples.push({ t: st.at, trainers });
    while (this.samples.length > 2 && this.samples[1]!.t <= st.at - RECENT_MS) this.samples.shift();
    if (step > this.furthest) {
      this.furthest = step;
      this.movedAt = st.at;
    }
    const ids = st.trainers.map((t) => t.id);
    let tokens = 0;
    let waited = 0;
    let wall = 0;
    for (let i = 1; i < this.samples.length; i++) {
      const [a, b] = [this.samples[i - 1]!, this.samples[i]!];
      const dt = b.t - a.t;
      for (const id of ids) {
        const [x, y] = [a.trainers.get(id), b.trainers.get(id)];
        wall += dt;
        const stepped = x && y && y.tokens > x.tokens;
        if (stepped) tokens += y.tokens - x.tokens;
        waited += stepped ? Math.min(dt, Math.max(0, y.waitMs - x.waitMs)) : dt;
      }
    }
    const span = this.samples.length > 1 ? st.at - this.samples[0]!.t : 0;
    return {
      tokensPerS: span > 0 ? (tokens * 1000) / span : 0,
      waitFraction: wall > 0 ? waited / wall : 0,
      stalledS: this.movedAt ? (st.at - this.movedAt) / 1000 : 0,
    };
  }
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);
const mean = (xs: number[]) => (xs.length ? sum(xs) / xs.length : NaN);

/**
 * One record of the run from one status poll. With `live` (saeflow up's own view), throughput and
 * trainer wait are those of the last RECENT_MS, the step a trainer that did not answer was last seen
 * at is kept, and what is down is named.
 */
export function summarise(
  st: RunStatus,
  startedAt: number,
  steps: number,
  live?: { recent: RecentWindow; down: string[]; lastStep: number },
): PipelineRecord {
  const hooks = st.buffer.flatMap((b) => b.status?.hookPoints ?? []);
  const trainers = st.trainers.flatMap((t) => (t.status ? [t.status] : []));
  const saes = trainers.flatMap((t) => t.saes);
  const wall = sum(trainers.map((t) => t.wallMs));
  const answered = trainers.length === st.trainers.length && saes.length > 0;
  const step = answered ? Math.min(...saes.map((s) => Number(s.step))) : (live?.lastStep ?? 0);
  const recent = live?.recent.observe(st, step);
  return {
    t: st.at,
    elapsedS: (st.at - startedAt) / 1000,
    step,
    steps,
    producerTokens: sum(st.producers.map((p) => Number(p.status?.tokens ?? 0n))),
    producerTokensPerS: sum(st.producers.map((p) => p.status?.tokensPerSecond ?? 0)),
    trainerTokens: sum(trainers.map((t) => Number(t.saes[0]?.tokens ?? 0n))),
    trainerTokensPerS: recent ? recent.tokensPerS : sum(trainers.map((t) => t.saes[0]?.tokensPerSecond ?? 0)),
    loss: mean(saes.map((s) => s.loss)),
    l0: mean(saes.map((s) => s.l0)),
    explainedVariance: mean(saes.map((s) => s.explainedVariance)),
    bufferFill: mean(hooks.map((h) => h.fillFraction)),
    bufferRowsIn: sum(hooks.map((h) => Number(h.rowsIn))),
    bufferRowsOut: sum(hooks.map((h) => Number(h.rowsOut))),
    trainerWaitFraction: recent ? recent.waitFraction : wall > 0 ? sum(trainers.map((t) => t.waitMs)) / wall : 0,
    bufferHoldFraction: holdFraction(hooks, st.at - startedAt),
    refillCycles: sum(hooks.map((h) => Number(h.refillCycles))),
    ...(live ? { down: live.down, stalledS: recent!.stalledS } : {}),
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

/** What the line adds when something is wrong: what is down, and how long no step was taken. */
function notes(r: PipelineRecord): string {
  const said: string[] = [];
  if (r.down?.length) said.push(`down: ${r.down.join(", ")}`);
  if ((r.stalledS ?? 0) >= 3 && r.step < r.steps) said.push(`no step for ${r.stalledS!.toFixed(0)} s`);
  return said.map((s) => ` | ${s}`).join("");
}

const FORMAT = "step {value}/{total} | {tokens} tok | {tps} tok/s | loss {loss} | L0 {l0} | buffer {fill} | trainer wait {wait}{notes}";

export class ProgressLine {
  private readonly bar: SingleBar;
  private started = false;
  private lastPlain = 0;
  private lastDown = "";
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
      fill: Number.isFinite(r.bufferFill) ? `${(r.bufferFill * 100).toFixed(0)}%` : "-",
      wait: `${(r.trainerWaitFraction * 100).toFixed(0)}%`,
      notes: notes(r),
    };
    if (!this.tty) {
      // Also at once when what is down changes, so a log shows when a fault began and ended.
      const down = (r.down ?? []).join();
      const changed = down !== this.lastDown;
      this.lastDown = down;
      if (r.t - this.lastPlain < 10_000 && r.step < r.steps && !changed) return;
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
