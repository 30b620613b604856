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

/** The progress line of one SAE's window. */
const progressLine = (m: WindowMetrics, steps: number): string =>
  `${m.sae} step ${m.step}/${steps} loss ${m.loss.toPrecision(4)} mse ${m.mse.toPrecision(4)} ev ${m.explained_variance.toFixed(3)} ` +
  `l0 ${m.l0.toFixed(1)} dead ${(100 * m.dead_fraction).toFixed(1)}% ${Math.round(m.tokens_per_second)} tok/s`;

/**
 * The logging windows of a sweep: each SAE's sums, the clock and batch waits they share, and where a
 * closed window goes (the SAE's metrics.jsonl, the Status RPC's latest record, the meters, a
 * progress line).
 */
export class MetricWindows {
  private readonly windows: Window[];
  private readonly files: MetricsFile[];
  private readonly latestOf: Array<WindowMetrics | undefined>;
  private readonly meters = new TrainerMeters();
  private startedAt = 0;
  private windowStartedAt = 0;
  private windowRows = 0;
  private windowWaitMs = 0;
  private totalWaitMs = 0;

  constructor(
    private readonly saes: ReadonlyArray<{ name: string; metricsPath: string }>,
    private readonly steps: number,
    private readonly log: (line: string) => void,
  ) {
    this.windows = saes.map(() => new Window());
    this.files = saes.map((s) => new MetricsFile(s.metricsPath));
    this.latestOf = saes.map(() => undefined);
  }

  /** Training begins: the run's clock and its first window start now. */
  start(): void {
    this.startedAt = this.windowStartedAt = performance.now();
  }

  /** One SAE's step: its stats and firings, and the k and learning rate it was taken with. */
  add(sae: number, stats: Float32Array, fires: Float32Array, rows: number, step: { k: number; lr: number }): void {
    this.windows[sae]!.add(stats, fires, rows, step);
  }

  /** The sweep's step is done: how long it took, its rows, and how long it waited for its batch. */
  stepped(durationMs: number, rows: number, waitedMs: number): void {
    this.windowRows += rows;
    this.windowWaitMs += waitedMs;
    this.totalWaitMs += waitedMs;
    this.meters.step(
      durationMs,
      rows,
      waitedMs,
      this.saes.map((s) => s.name),
    );
  }

  /** Some SAE has steps not yet logged. */
  get pending(): boolean {
    return this.windows.some((w) => !w.empty);
  }

  /** Closes the window at `at`: every SAE with steps in it gets its averages written, metered and logged. */
  take(at: { step: number; tokens: number }, deadFraction: (sae: number) => number): void {
    const now = performance.now();
    const seconds = (now - this.windowStartedAt) / 1000;
    this.windows.forEach((window, i) => {
      if (window.empty) return;
      const m: WindowMetrics = {
        sae: this.saes[i]!.name,
        step: at.step,
        tokens: at.tokens,
        ...window.take(),
        dead_fraction: deadFraction(i),
        tokens_per_second: seconds > 0 ? this.windowRows / seconds : 0,
        wait_ms: this.windowWaitMs,
        elapsed_s: (now - this.startedAt) / 1000,
      };
      this.latestOf[i] = m;
      this.files[i]!.append(m);
      this.meters.window(m);
      this.log(progressLine(m, this.steps));
    });
    this.windowRows = 0;
    this.windowWaitMs = 0;
    this.windowStartedAt = now;
  }

  /** The SAE's last logged window, if any. */
  latest(sae: number): WindowMetrics | undefined {
    return this.latestOf[sae];
  }

  /** Milliseconds the run has waited for batches. */
  get waitMs(): number {
    return this.totalWaitMs;
  }

  /** Milliseconds since training began; 0 before. */
  get wallMs(): number {
    return this.startedAt ? performance.now() - this.startedAt : 0;
  }
}
