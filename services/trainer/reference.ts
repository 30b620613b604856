import { PARAMS, type ParamName, STAT, STAT_COUNT, type StepSpec } from "./graph/step.js";
import type { SaeState } from "./sae.js";

/**
 * The training step in plain TypeScript, in float64: the reference the ONNX step graph is tested
 * against, and the function finite differences are taken of. Written for clarity, not speed; use it
 * on small sizes only.
 */

export type Params64 = Record<ParamName, Float64Array>;

export interface StepScalars {
  /** Normalisation factor applied to x. */
  scale: number;
  /** Learning rate at this step. */
  lr: number;
  /** Adam step, from 1. */
  t: number;
  /** relu: L1 weight. */
  l1Coef: number;
  /** Dead latent ids (AuxK); empty for none. */
  deadIdx: readonly number[];
  /** Latents AuxK uses per token. */
  auxK: number;
  /** AuxK coefficient * min(dead / k_aux, 1). */
  auxScale: number;
}

/** The AuxK target, held fixed when taking finite differences (it is a constant to the gradient). */
export interface Residual {
  err: Float64Array;
  errVar: number;
}

export interface Evaluation {
  /** sse / B + aux + penalty. */
  loss: number;
  stats: Float64Array;
  fires: Float64Array;
  grads: Params64;
  residual: Residual;
}

interface Entry {
  row: number;
  latent: number;
  /** Value selected (pre-activation, after ReLU for batchtopk). */
  value: number;
}

const byValue = (a: { value: number; key: number }, b: { value: number; key: number }) => b.value - a.value || a.key - b.key;

/** The entries each recipe keeps: per-row top k, batch top B*k, or every positive pre-activation. */
function select(spec: StepSpec, pre: Float64Array, B: number, n: number): Entry[] {
  const out: Entry[] = [];
  if (spec.recipe === "topk") {
    for (let b = 0; b < B; b++) {
      const row = Array.from({ length: n }, (_, i) => ({ value: pre[b * n + i]!, key: i }));
      for (const e of row.sort(byValue).slice(0, spec.k)) out.push({ row: b, latent: e.key, value: e.value });
    }
  } else if (spec.recipe === "batchtopk") {
    const flat = Array.from({ length: B * n }, (_, i) => ({ value: Math.max(pre[i]!, 0), key: i }));
    for (const e of flat.sort(byValue).slice(0, B * spec.k)) out.push({ row: Math.floor(e.key / n), latent: e.key % n, value: e.value });
  } else {
    for (let i = 0; i < B * n; i++) if (pre[i]! > 0) out.push({ row: Math.floor(i / n), latent: i % n, value: pre[i]! });
  }
  return out;
}

const dot = (a: Float64Array, ai: number, b: Float64Array, bi: number, d: number) => {
  let s = 0;
  for (let j = 0; j < d; j++) s += a[ai + j]! * b[bi + j]!;
  return s;
};
const axpy = (alpha: number, x: Float64Array, xi: number, y: Float64Array, yi: number, d: number) => {
  for (let j = 0; j < d; j++) y[yi + j]! += alpha * x[xi + j]!;
};

/** Loss, statistics and gradients of one batch. */
export function evaluate(spec: StepSpec, P: Params64, x: Float32Array, sc: StepScalars, fixedResidual?: Residual): Evaluation {
  const { batchSize: B, dModel: d, width: n } = spec;
  const xNorm = Float64Array.from(x, (v) => v * sc.scale);
  const xCent = xNorm.map((v, i) => v - P.b_dec[i % d]!);
  const pre = new Float64Array(B * n);
  for (let b = 0; b < B; b++) for (let i = 0; i < n; i++) pre[b * n + i] = dot(xCent, b * d, P.W_enc, i * d, d) + P.b_enc[i]!;

  const entries = select(spec, pre, B, n);
  const decNorm = Float64Array.from({ length: n }, (_, i) => Math.sqrt(dot(P.W_dec, i * d, P.W_dec, i * d, d)));
  const xHat = new Float64Array(B * d);
  for (let b = 0; b < B; b++) xHat.set(P.b_dec, b * d);
  const fires = new Float64Array(n);
  const actsSum = new Float64Array(n);
  let minAct = 0;
  for (const e of entries) {
    const act = Math.max(e.value, 0);
    axpy(act, P.W_dec, e.latent * d, xHat, e.row * d, d);
    if (e.value > 0) {
      fires[e.latent]! += 1;
      actsSum[e.latent]! += act;
      if (spec.recipe === "batchtopk" && (minAct === 0 || e.value < minAct)) minAct = e.value;
    }
  }
  const err = xHat.map((v, i) => v - xNorm[i]!);
  const sse = err.reduce((a, v) => a + v * v, 0);
  const mean = new Float64Array(d);
  for (let i = 0; i < B * d; i++) mean[i % d]! += xNorm[i]! / B;
  const variance = xNorm.reduce((a, v, i) => a + (v - mean[i % d]!) ** 2, 0);
  const l1 = spec.recipe === "relu" ? sc.l1Coef / B : 0;
  const penalty = spec.recipe === "relu" ? actsSum.reduce((a, s, i) => a + s * decNorm[i]!, 0) * l1 : 0;

  // Backward through the main code.
  const G: Params64 = { W_enc: new Float64Array(n * d), b_enc: new Float64Array(n), W_dec: new Float64Array(n * d), b_dec: new Float64Array(d) };
  const dRecon = err.map((v) => (2 / B) * v);
  for (const e of entries) {
    if (!(e.value > 0)) continue;
    const dAct = dot(dRecon, e.row * d, P.W_dec, e.latent * d, d) + l1 * decNorm[e.latent]!;
    axpy(e.value, dRecon, e.row * d, G.W_dec, e.latent * d, d);
    axpy(dAct, xCent, e.row * d, G.W_enc, e.latent * d, d);
    G.b_enc[e.latent]! += dAct;
  }
  if (spec.recipe === "relu") {
    for (let i = 0; i < n; i++) axpy((l1 * actsSum[i]!) / Math.max(decNorm[i]!, 1e-12), P.W_dec, i * d, G.W_dec, i * d, d);
  }

  // AuxK: the top auxK dead latents of each token fit the residual x_norm - x_hat.
  const residual: Residual = fixedResidual ?? { err, errVar: 0 };
  if (!fixedResidual) {
    const errMean = new Float64Array(d);
    for (let i = 0; i < B * d; i++) errMean[i % d]! += err[i]! / B;
    residual.errVar = Math.max(err.reduce((a, v, i) => a + (v - errMean[i % d]!) ** 2, 0), 1e-30);
  }
  let aux = 0;
  const auxOn = spec.auxK && spec.recipe !== "relu" && sc.deadIdx.length > 0 && sc.auxScale > 0;
  if (auxOn) {
    const weight = sc.auxScale / residual.errVar;
    for (let b = 0; b < B; b++) {
      const kept = sc.deadIdx
        .map((latent, key) => ({ value: pre[b * n + latent]!, key, latent }))
        .sort(byValue)
        .slice(0, sc.auxK)
        .filter((e) => e.value > 0);
      const resid = residual.err.slice(b * d, (b + 1) * d);
      for (const e of kept) axpy(e.value, P.W_dec, e.latent * d, resid, 0, d);
      aux += weight * resid.reduce((a, v) => a + v * v, 0);
      const dResid = resid.map((v) => 2 * weight * v);
      for (const e of kept) {
        const dAct = dot(dResid, 0, P.W_dec, e.latent * d, d);
        axpy(e.value, dResid, 0, G.W_dec, e.latent * d, d);
        axpy(dAct, xCent, b * d, G.W_enc, e.latent * d, d);
        G.b_enc[e.latent]! += dAct;
      }
    }
  }

  // b_dec: added to x_hat, and subtracted before the encoder.
  for (let b = 0; b < B; b++) axpy(1, dRecon, b * d, G.b_dec, 0, d);
  for (let i = 0; i < n; i++) axpy(-G.b_enc[i]!, P.W_enc, i * d, G.b_dec, 0, d);

  const stats = new Float64Array(STAT_COUNT);
  stats[STAT.sse] = sse;
  stats[STAT.variance] = variance;
  stats[STAT.aux] = aux;
  stats[STAT.penalty] = penalty;
  stats[STAT.minAct] = minAct;
  return { loss: sse / B + aux + penalty, stats, fires, grads: G, residual };
}

export const toParams64 = (s: SaeState): Params64 =>
  Object.fromEntries(PARAMS.map((p) => [p, Float64Array.from(s[p])])) as Params64;

/** One full step: gradients, Adam with bias correction, decoder renormalisation. */
export function referenceStep(spec: StepSpec, state: SaeState, x: Float32Array, sc: StepScalars): { next: SaeState; evaluation: Evaluation } {
  const { dModel: d, width: n } = spec;
  const evaluation = evaluate(spec, toParams64(state), x, sc);
  const next = {} as SaeState;
  const bc1 = 1 - spec.beta1 ** sc.t;
  const sqrtBc2 = Math.sqrt(1 - spec.beta2 ** sc.t);
  for (const p of PARAMS) {
    const g = evaluation.grads[p];
    const m = Float32Array.from(state[`m_${p}`], (v, i) => spec.beta1 * v + (1 - spec.beta1) * g[i]!);
    const v = Float32Array.from(state[`v_${p}`], (v, i) => spec.beta2 * v + (1 - spec.beta2) * g[i]! * g[i]!);
    next[p] = Float32Array.from(state[p], (w, i) => w - (sc.lr / bc1) * (m[i]! / (Math.sqrt(v[i]!) / sqrtBc2 + spec.eps)));
    next[`m_${p}`] = m;
    next[`v_${p}`] = v;
  }
  if (spec.unitNormDecoder) {
    for (let i = 0; i < n; i++) {
      const row = next.W_dec.subarray(i * d, (i + 1) * d);
      const norm = Math.max(Math.sqrt(row.reduce((a, v) => a + v * v, 0)), 1e-12);
      for (let j = 0; j < d; j++) row[j]! /= norm;
    }
  }
  return { next, evaluation };
}
