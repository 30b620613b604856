import {
  type CoreParam,
  type GatedParam,
  type JumpReluParam,
  type StateName,
  stateOf,
  stateShape,
  type StepRecipe,
  type WithMoments,
} from "./graph/step.js";
import type { Rng } from "./rng.js";

/**
 * Parameters and Adam moments of one SAE, latent-major: W_enc and W_dec are both [n, d]. gated adds
 * its magnitude path (r_mag, b_mag); b_enc is then its gate bias. jumprelu_trained adds its
 * threshold parameter.
 */
export type SaeState = Record<WithMoments<CoreParam>, Float32Array> &
  Partial<Record<WithMoments<GatedParam | JumpReluParam>, Float32Array>>;

/** A state tensor the recipe holds; an error names it when the state lacks it. */
export function stateTensor(state: SaeState, name: StateName): Float32Array {
  const t = state[name];
  if (!t) throw new Error(`the SAE state has no ${name}`);
  return t;
}

export function allocState(n: number, d: number, recipe: StepRecipe = "topk"): SaeState {
  return Object.fromEntries(stateOf(recipe).map((s) => [s, new Float32Array(stateShape(s, n, d).reduce((a, b) => a * b, 1))])) as SaeState;
}

export function copyState(from: SaeState, to: SaeState, recipe: StepRecipe = "topk"): void {
  for (const s of stateOf(recipe)) stateTensor(to, s).set(stateTensor(from, s));
}

/**
 * Decoder rows drawn at random and scaled to `decoderNorm` (1 unless asked; Llama Scope used 0.5);
 * the encoder starts as the decoder's transpose (the same [n, d] matrix here), biases (and gated's
 * r_mag) at 0, b_dec at `bDec`, a JumpReLU's thresholds at `threshold` (SAELens' 0.01 unless
 * asked), moments at 0.
 */
export function initState(
  n: number,
  d: number,
  rng: Rng,
  bDec: Float32Array,
  opts: { decoderNorm?: number; recipe?: StepRecipe; threshold?: number } = {},
): SaeState {
  const s = allocState(n, d, opts.recipe);
  const target = opts.decoderNorm ?? 1;
  for (let i = 0; i < n; i++) {
    const row = s.W_dec.subarray(i * d, (i + 1) * d);
    let norm = 0;
    for (let j = 0; j < d; j++) {
      const v = rng.normal();
      row[j] = v;
      norm += v * v;
    }
    const factor = target / Math.sqrt(norm);
    for (let j = 0; j < d; j++) row[j]! *= factor;
  }
  s.W_enc.set(s.W_dec);
  s.b_dec.set(bDec);
  s.threshold?.fill(opts.threshold ?? 0.01);
  return s;
}

/** |W_dec_i| of every latent. */
export function decoderNorms(state: SaeState, n: number, d: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let sq = 0;
    for (let j = i * d; j < (i + 1) * d; j++) sq += state.W_dec[j]! * state.W_dec[j]!;
    out[i] = Math.sqrt(sq);
  }
  return out;
}

/** sqrt(d) / E|x|: the factor that gives rows an average norm of sqrt(d) (SAELens "expected_average_only_in"). */
export function normalisationScale(batches: readonly Float32Array[], d: number): number {
  let sum = 0;
  let rows = 0;
  for (const batch of batches) {
    for (let r = 0; r < batch.length / d; r++) {
      let sq = 0;
      for (let j = r * d; j < (r + 1) * d; j++) sq += batch[j]! * batch[j]!;
      sum += Math.sqrt(sq);
      rows++;
    }
  }
  return sum > 0 ? Math.sqrt(d) / (sum / rows) : 1;
}

/** b_dec's starting point in normalised units: zeros, the mean row, or the geometric median (Weiszfeld). */
export function initialBDec(
  batches: readonly Float32Array[],
  d: number,
  scale: number,
  method: "mean" | "geometric_median" | "zeros",
): Float32Array {
  const out = new Float32Array(d);
  if (method === "zeros") return out;
  const mean = new Float64Array(d);
  let rows = 0;
  for (const batch of batches) {
    for (let i = 0; i < batch.length; i++) mean[i % d]! += batch[i]! * scale;
    rows += batch.length / d;
  }
  for (let j = 0; j < d; j++) mean[j]! /= rows;
  if (method === "geometric_median") weiszfeld(batches, d, scale, mean);
  out.set(mean);
  return out;
}

/** Refines `point` in place toward the geometric median of the rows. */
function weiszfeld(batches: readonly Float32Array[], d: number, scale: number, point: Float64Array, iterations = 50, tol = 1e-6): void {
  const next = new Float64Array(d);
  for (let it = 0; it < iterations; it++) {
    next.fill(0);
    let weights = 0;
    for (const batch of batches) {
      for (let r = 0; r < batch.length / d; r++) {
        let dist = 0;
        for (let j = 0; j < d; j++) {
          const diff = batch[r * d + j]! * scale - point[j]!;
          dist += diff * diff;
        }
        const w = 1 / Math.max(Math.sqrt(dist), 1e-12);
        weights += w;
        for (let j = 0; j < d; j++) next[j]! += w * batch[r * d + j]! * scale;
      }
    }
    let moved = 0;
    let size = 0;
    for (let j = 0; j < d; j++) {
      const v = next[j]! / weights;
      moved += (v - point[j]!) ** 2;
      size += v * v;
      point[j] = v;
    }
    if (Math.sqrt(moved) <= tol * Math.max(Math.sqrt(size), 1)) return;
  }
}
