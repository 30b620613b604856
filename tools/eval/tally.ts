import type { Sae } from "./sae.js";
import type { SpliceResult } from "./splice.js";

/** Running sums of one SAE over the contexts. */
export class SaeTally {
  ce = 0;
  kl = 0;
  tokens = 0;
  active = 0;
  sse = 0;
  cos = 0;
  dot = 0;
  hatSq = 0;
  xSq = 0;
  readonly xSum: Float64Array;

  constructor(readonly sae: Sae) {
    this.xSum = new Float64Array(sae.dIn);
  }

  /** Reconstruction figures of rows x / xHat [rows, d]. */
  addRows(x: Float32Array, xHat: Float32Array, l0: Uint32Array, d: number): void {
    for (let r = 0; r < l0.length; r++) {
      let dot = 0;
      let xx = 0;
      let hh = 0;
      let err = 0;
      for (let j = r * d; j < (r + 1) * d; j++) {
        const a = x[j]!;
        const b = xHat[j]!;
        dot += a * b;
        xx += a * a;
        hh += b * b;
        err += (a - b) * (a - b);
        this.xSum[j - r * d]! += a;
      }
      this.dot += dot;
      this.xSq += xx;
      this.hatSq += hh;
      this.sse += err;
      this.cos += xx > 0 && hh > 0 ? dot / Math.sqrt(xx * hh) : 0;
      this.active += l0[r]!;
      this.tokens += 1;
    }
  }

  result(original: number, zero: number, predictions: number): SpliceResult {
    const lmSae = this.ce / predictions;
    const meanSq = this.xSum.reduce((s, v) => s + (v / this.tokens) ** 2, 0);
    const variance = this.xSq - this.tokens * meanSq;
    return {
      sae: this.sae.dir,
      hook: this.sae.hookName,
      architecture: this.sae.architecture,
      d_sae: this.sae.dSae,
      lm_loss_original: original,
      lm_loss_sae: lmSae,
      lm_loss_zero: zero,
      delta_lm_loss: lmSae - original,
      fraction_loss_recovered: (zero - lmSae) / (zero - original),
      kl_divergence: this.kl / predictions,
      cosine_similarity: this.cos / this.tokens,
      relative_reconstruction_bias: this.hatSq / this.dot,
      mse: this.sse / this.tokens,
      explained_variance: 1 - this.sse / variance,
      l0: this.active / this.tokens,
      tokens: this.tokens,
      predictions,
    };
  }
}
