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
  aux_loss: number;
  penalty: number;
  /** mse + aux_loss + penalty. */
  loss: number;
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
  private active = 0;
  private rows = 0;
  private steps = 0;

  add(stats: Float32Array, fires: Float32Array, rows: number): void {
    this.sse += stats[STAT.sse]!;
    this.variance += stats[STAT.variance]!;
    this.aux += stats[STAT.aux]!;
    this.penalty += stats[STAT.penalty]!;
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
  take(): Pick<WindowMetrics, "mse" | "fvu" | "explained_variance" | "l0" | "aux_loss" | "penalty" | "loss"> {
    const mse = this.sse / this.rows;
    const fvu = this.variance > 0 ? this.sse / this.variance : 0;
    const aux = this.aux / this.steps;
    const penalty = this.penalty / this.steps;
    const out = { mse, fvu, explained_variance: 1 - fvu, l0: this.active / this.rows, aux_loss: aux, penalty, loss: mse + aux + penalty };
    this.sse = this.variance = this.aux = this.penalty = this.active = this.rows = this.steps = 0;
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
  private readonly wait = this.meter.createCounter("saeflow.trainer.batch_wait", { unit: "ms", description: "Time spent waiting for batches." });
  private readonly stepDuration = this.meter.createHistogram("saeflow.trainer.step_duration", { unit: "ms", description: "Wall time of one step of the sweep." });

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
