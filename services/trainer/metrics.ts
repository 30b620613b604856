import { metrics, type ObservableResult } from "@opentelemetry/api";
import { appendFileSync, mkdirSync } from "node:fs";
import { dirname } from "node:path";
import { STAT } from "./graph/step.js";

/** One logged window of one SAE: what the JSONL line, the Status RPC and the OTel gauges report. */
export interface WindowMetrics {
  sae: string;
  step: number;
  tokens: number;
  /** Mean over tokens of |x - x_hat|^2 in normalised units (SAELens' mse_loss). */
  mse: number;
  /** Fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean x|^2. */
  fvu: number;
  explained_variance: number;
  /** Mean latents active per token. */
  l0: number;
  /** Fraction of latents that have not fired within the dead window. */
  dead_fraction: number;
  /** AuxK's loss, or gated's reconstruction through the gate. */
  aux_loss: number;
  penalty: number;
  /** matryoshka: the inner prefixes' squared errors per token, summed over prefixes. */
  prefix_loss: number;
  /** mse + prefix_loss + aux_loss + penalty. */
  loss: number;
  /** Global gradient norm before clipping, averaged over the window. */
  grad_norm: number;
  /** Active latents per token asked of ranked codes at the window's last step (k while it anneals). */
  k: number;
  /** Learning rate of the window's last step. */
  learning_rate: number;
  tokens_per_second: number;
  /** Milliseconds this window waited for batches. */
  wait_ms: number;
  /** Wall seconds since training began. */
  elapsed_s: number;
}

/** Sums over the steps of a logging window. */
export class Window {
  private sse = 0;
  private variance = 0;
  private aux = 0;
  private penalty = 0;
  private prefix = 0;
  private gradNorm = 0;
  private k = 0;
  private lr = 0;
  private active = 0;
  private rows = 0;
  private steps = 0;

  /** One step's stats and firings, and the k and learning rate it was taken with. */
  add(stats: Float32Array, fires: Float32Array, rows: number, step: { k: number; lr: number }): void {
    this.sse += stats[STAT.sse]!;
    this.variance += stats[STAT.variance]!;
    this.aux += stats[STAT.aux]!;
    this.penalty += stats[STAT.penalty]!;
    this.prefix += stats[STAT.prefix]!;
    this.gradNorm += stats[STAT.gradNorm]!;
    this.k = step.k;
    this.lr = step.lr;
    let fired = 0;
    for (let i = 0; i < fires.length; i++) fired += fires[i]!;
    this.active += fired;
    this.rows += rows;
    this.steps += 1;
  }

  get empty(): boolean {
    return this.steps === 0;
  }

  /** Averages of the window, then a reset. */
  take(): Pick<
    WindowMetrics,
    "mse" | "fvu" | "explained_variance" | "l0" | "aux_loss" | "penalty" | "prefix_loss" | "loss" | "grad_norm" | "k" | "learning_rate"
  > {
    const mse = this.sse / this.rows;
    const fvu = this.variance > 0 ? this.sse / this.variance : 0;
    const aux = this.aux / this.steps;
    const penalty = this.penalty / this.steps;
    const prefix = this.prefix / this.rows;
    const out = {
      mse,
      fvu,
      explained_variance: 1 - fvu,
      l0: this.active / this.rows,
      aux_loss: aux,
      penalty,
      prefix_loss: prefix,
      loss: mse + prefix + aux + penalty,
      grad_norm: this.gradNorm / this.steps,
      k: this.k,
      learning_rate: this.lr,
    };
    this.sse = this.variance = this.aux = this.penalty = this.prefix = this.gradNorm = this.active = this.rows = this.steps = 0;
    return out;
  }
}

/** Appends metric lines to a JSONL file a person can plot. */
export class MetricsFile {
  constructor(readonly path: string) {
    mkdirSync(dirname(path), { recursive: true });
  }

  append(record: WindowMetrics): void {
    appendFileSync(this.path, `${JSON.stringify(record)}\n`);
  }
}

const GAUGES: Array<[keyof WindowMetrics, string, string]> = [
  ["mse", "saeflow.trainer.mse", "Mean squared reconstruction error per token (normalised units)."],
  ["explained_variance", "saeflow.trainer.explained_variance", "1 - fraction of variance unexplained."],
  ["l0", "saeflow.trainer.l0", "Mean active latents per token."],
  ["dead_fraction", "saeflow.trainer.dead_fraction", "Fraction of latents dead within the window."],
  ["loss", "saeflow.trainer.loss", "Total loss."],
  ["tokens_per_second", "saeflow.trainer.tokens_per_second", "Training throughput."],
];

/**
 * OpenTelemetry instruments: counters as steps happen, gauges read from the latest windows. Made after
 * the SDK is installed, since the metrics API hands out no-op meters before that.
 */
export class TrainerMeters {
  private readonly latest = new Map<string, WindowMetrics>();
  private readonly meter = metrics.getMeter("saeflow.trainer");
  private readonly tokens = this.meter.createCounter("saeflow.trainer.tokens", { description: "Tokens trained on, per SAE." });
  private readonly wait = this.meter.createCounter("saeflow.trainer.batch_wait", {
    unit: "ms",
    description: "Time spent waiting for batches.",
  });
  private readonly stepDuration = this.meter.createHistogram("saeflow.trainer.step_duration", {
    unit: "ms",
    description: "Wall time of one step of the sweep.",
  });

  constructor() {
    for (const [key, name, description] of GAUGES) {
      this.meter.createObservableGauge(name, { description }).addCallback((result: ObservableResult) => {
        for (const [sae, m] of this.latest) result.observe(m[key] as number, { sae });
      });
    }
  }

  step(durationMs: number, rows: number, waitMs: number, saes: readonly string[]): void {
    this.stepDuration.record(durationMs);
    this.wait.add(waitMs);
    for (const sae of saes) this.tokens.add(rows, { sae });
  }

  window(m: WindowMetrics): void {
    this.latest.set(m.sae, m);
  }
}
