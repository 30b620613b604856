/**
 * How often each latent fired over recent tokens, for SAELens' sparsity.safetensors. Counts are
 * kept over tumbling windows of whole batches (SAELens' feature_sampling_window, sized in tokens
 * here) laid out backwards from the run's last step, so the window that closes at the last step
 * holds exactly the last `windowSteps` batches.
 */
export interface FiringCounts {
  /** Tokens each latent fired on. */
  fired: Float64Array;
  /** Tokens counted. */
  tokens: number;
}

export class FiringWindows {
  current: FiringCounts;
  previous: FiringCounts;

  constructor(
    n: number,
    private readonly windowSteps: number,
    private readonly lastStep: number,
  ) {
    this.current = { fired: new Float64Array(n), tokens: 0 };
    this.previous = { fired: new Float64Array(n), tokens: 0 };
  }

  /** Counts the step that brought the run to `stepsDone`; a window closes when a whole number of windows remain. */
  add(fires: Float32Array, rows: number, stepsDone: number): void {
    const { fired } = this.current;
    for (let i = 0; i < fired.length; i++) fired[i]! += fires[i]!;
    this.current.tokens += rows;
    if ((this.lastStep - stepsDone) % this.windowSteps === 0) {
      [this.previous, this.current] = [this.current, this.previous];
      this.current.fired.fill(0);
      this.current.tokens = 0;
    }
  }

  /** The most recent complete window, or the one under way when none has closed yet. */
  latest(): FiringCounts {
    return this.previous.tokens > 0 ? this.previous : this.current;
  }
}

/** SAELens' log10 feature sparsity: log10(fired / tokens + 1e-10), as its trainer writes it. */
export function logSparsity(counts: FiringCounts): Float32Array {
  return Float32Array.from(counts.fired, (f) => Math.log10((counts.tokens > 0 ? f / counts.tokens : 0) + 1e-10));
}
