import { type Counter, metrics, type ObservableGauge, type ObservableResult, trace, type Tracer } from "@opentelemetry/api";

/**
 * The buffer's tracer and metric instruments. Made per buffer, after startTelemetry: a meter taken
 * from @opentelemetry/api before the SDK is installed stays a no-op forever.
 */
export class Instruments {
  readonly tracer: Tracer = trace.getTracer("saeflow.buffer");
  readonly rowsIn: Counter;
  readonly rowsOut: Counter;
  readonly rowsDropped: Counter;
  readonly chunksRefused: Counter;
  readonly refillCycles: Counter;
  readonly trainerWaitMs: Counter;
  private readonly fillFraction: ObservableGauge;
  private readonly observeFill: (result: ObservableResult) => void;

  /** `fill` lists each hook point with its unconsumed fraction of capacity. */
  constructor(fill: () => Iterable<[hookPoint: string, fraction: number]>) {
    const meter = metrics.getMeter("saeflow.buffer");
    this.rowsIn = meter.createCounter("saeflow.buffer.rows_in", { description: "Rows accepted into a pool." });
    this.rowsOut = meter.createCounter("saeflow.buffer.rows_out", { description: "Rows that left a pool after every consumer had them." });
    this.rowsDropped = meter.createCounter("saeflow.buffer.rows_dropped", { description: "Rows of valid chunks not pooled, by reason." });
    this.chunksRefused = meter.createCounter("saeflow.buffer.chunks_refused", {
      description: "Chunks refused by the checks, by field at fault.",
    });
    this.refillCycles = meter.createCounter("saeflow.buffer.refill_cycles", { description: "Times a pool fell to its low watermark." });
    this.trainerWaitMs = meter.createCounter("saeflow.buffer.trainer_wait", {
      unit: "ms",
      description: "Time trainer streams waited for rows.",
    });
    this.fillFraction = meter.createObservableGauge("saeflow.buffer.fill_fraction", { description: "Unconsumed rows over capacity." });
    this.observeFill = (result) => {
      for (const [hookPoint, fraction] of fill()) result.observe(fraction, { hook_point: hookPoint });
    };
    this.fillFraction.addCallback(this.observeFill);
  }

  close(): void {
    this.fillFraction.removeCallback(this.observeFill);
  }
}
