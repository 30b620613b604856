import { STEP_RECIPES } from "../common/config/recipes.js";
import { JUMPRELU_DEFAULTS } from "./graph/jumprelu.js";
import { type CoreParam, type GatedParam, type JumpReluParam, paramsOf, STAT, STAT_COUNT, type StepSpec } from "./graph/step.js";
import { type SaeState, stateTensor } from "./sae.js";

/**
 * The training step in plain TypeScript, in float64: the reference the ONNX step graphs are tested
 * against, and the function finite differences are taken of. Written for clarity, not speed; use it
 * on small sizes only.
 */

export type Params64 = Record<CoreParam, Float64Array> & Partial<Record<GatedParam | JumpReluParam, Float64Array>>;

export interface StepScalars {
  /** Normalisation factor applied to x. */
  scale: number;
  /** Learning rate at this step. */
  lr: number;
  /** Adam step, from 1. */
  t: number;
  /** The sparsity penalty's weight: relu, gated: L1; jumprelu_trained: L0 (or tanh). */
  sparsityCoef: number;
  /** jumprelu_trained: the pre-activation loss's weight on dead latents (`deadIdx`), where its graph has that loss. */
  preActCoef: number;
  /** Active latents per token at this step (ranked recipes). */
  k: number;
  /** Dead latent ids (AuxK, and jumprelu_trained's pre-activation loss); empty for none. */
  deadIdx: readonly number[];
  /** Latents AuxK uses per token. */
  auxK: number;
  /** AuxK coefficient * min(dead / k_aux, 1). */
  auxScale: number;
}

/** What the gradient treats as constants; held fixed when taking finite differences. */
export interface Frozen {
  /** AuxK's target: the main residual x_hat - x_norm [B, d], and its variance. */
  err: Float64Array;
  errVar: number;
  /** gated: the frozen decoder copy its auxiliary reconstruction goes through. */
  W_dec: Float64Array;
  b_dec: Float64Array;
}

export interface Evaluation {
  /** (sse + prefix) / B + aux + penalty. */
  loss: number;
  stats: Float64Array;
  fires: Float64Array;
  /** Gradients before clipping. */
  grads: Params64;
  frozen: Frozen;
}

interface Entry {
  row: number;
  latent: number;
  /** Value selected (pre-activation, after ReLU for the batch codes). */
  value: number;
  /** What it was ranked by. */
  score: number;
}

const byScore = (a: Entry & { key: number }, b: Entry & { key: number }) => b.score - a.score || a.key - b.key;

/**
 * The entries each recipe keeps: per-row top k, batch top B*k, or every positive pre-activation.
 * Ranked codes rank by relu(pre) x decoder norm when decoder norms are free (`rankNorm`).
 */
function select(spec: StepSpec, pre: Float64Array, rankNorm: Float64Array | undefined, k: number): Entry[] {
  const { batchSize: B, width: n } = spec;
  const out: Entry[] = [];
  const scoreOf = (i: number, v: number) => (rankNorm ? Math.max(v, 0) * rankNorm[i]! : v);
  const { keeps } = STEP_RECIPES[spec.recipe];
  if (keeps === "token-top-k") {
    for (let b = 0; b < B; b++) {
      const row = Array.from({ length: n }, (_, i) => ({
        row: b,
        latent: i,
        value: pre[b * n + i]!,
        score: scoreOf(i, pre[b * n + i]!),
        key: i,
      }));
      out.push(...row.sort(byScore).slice(0, k));
    }
  } else if (keeps === "batch-top-k") {
    const flat = Array.from({ length: B * n }, (_, i) => {
      const value = Math.max(pre[i]!, 0);
      return { row: Math.floor(i / n), latent: i % n, value, score: rankNorm ? value * rankNorm[i % n]! : value, key: i };
    });
    out.push(...flat.sort(byScore).slice(0, B * k));
  } else {
    for (let i = 0; i < B * n; i++) if (pre[i]! > 0) out.push({ row: Math.floor(i / n), latent: i % n, value: pre[i]!, score: pre[i]! });
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
const sumSq = (a: Float64Array) => a.reduce((s, v) => s + v * v, 0);

/** Loss, statistics and raw gradients of one batch. */
export function evaluate(spec: StepSpec, P: Params64, x: Float32Array, sc: StepScalars, frozen?: Frozen): Evaluation {
  const { batchSize: B, dModel: d, width: n } = spec;
  const xNorm = Float64Array.from(x, (v) => v * sc.scale);
  const xCent = xNorm.map((v, i) => v - P.b_dec[i % d]!);
  const enc = new Float64Array(B * n); // x_cent . W_enc_i
  for (let b = 0; b < B; b++) for (let i = 0; i < n; i++) enc[b * n + i] = dot(xCent, b * d, P.W_enc, i * d, d);
  const pre = enc.map((v, i) => v + P.b_enc[i % n]!);
  const decNorm = Float64Array.from({ length: n }, (_, i) => Math.sqrt(dot(P.W_dec, i * d, P.W_dec, i * d, d)));
  const mean = new Float64Array(d);
  for (let i = 0; i < B * d; i++) mean[i % d]! += xNorm[i]! / B;
  const stats = new Float64Array(STAT_COUNT);
  stats[STAT.variance] = xNorm.reduce((a, v, i) => a + (v - mean[i % d]!) ** 2, 0);
  const G: Params64 = {
    W_enc: new Float64Array(n * d),
    b_enc: new Float64Array(n),
    W_dec: new Float64Array(n * d),
    b_dec: new Float64Array(d),
  };
  const fixed: Frozen = frozen ?? {
    err: new Float64Array(0),
    errVar: 0,
    W_dec: Float64Array.from(P.W_dec),
    b_dec: Float64Array.from(P.b_dec),
  };
  const { magnitudePath, thresholded } = STEP_RECIPES[spec.recipe];
  const code = magnitudePath
    ? gatedCode(spec, P, xNorm, xCent, enc, pre, decNorm, sc, fixed, G)
    : thresholded
      ? thresholdCode(spec, P, xNorm, xCent, pre, decNorm, sc, G)
      : sparseCode(spec, P, xNorm, xCent, pre, decNorm, sc, G);
  stats[STAT.sse] = code.sse;
  stats[STAT.penalty] = code.penalty;
  stats[STAT.minAct] = code.minAct;
  stats[STAT.prefix] = code.prefix;

  // AuxK: the top auxK dead latents of each token fit the residual x_norm - x_hat.
  if (!frozen) {
    fixed.err = code.err;
    const errMean = new Float64Array(d);
    for (let i = 0; i < B * d; i++) errMean[i % d]! += code.err[i]! / B;
    fixed.errVar = Math.max(
      code.err.reduce((a, v, i) => a + (v - errMean[i % d]!) ** 2, 0),
      1e-30,
    );
  }
  let aux = code.aux;
  if (spec.auxK && STEP_RECIPES[spec.recipe].ranked && sc.deadIdx.length > 0 && sc.auxScale > 0) {
    const weight = sc.auxScale / fixed.errVar;
    for (let b = 0; b < B; b++) {
      const kept = sc.deadIdx
        .map((latent, key) => ({ score: pre[b * n + latent]!, key, latent }))
        .sort((p, q) => q.score - p.score || p.key - q.key)
        .slice(0, sc.auxK)
        .filter((e) => e.score > 0);
      const resid = fixed.err.slice(b * d, (b + 1) * d);
      for (const e of kept) axpy(e.score, P.W_dec, e.latent * d, resid, 0, d);
      aux += weight * sumSq(resid);
      const dResid = resid.map((v) => 2 * weight * v);
      for (const e of kept) {
        const dAct = dot(dResid, 0, P.W_dec, e.latent * d, d);
        axpy(e.score, dResid, 0, G.W_dec, e.latent * d, d);
        axpy(dAct, xCent, b * d, G.W_enc, e.latent * d, d);
        G.b_enc[e.latent]! += dAct;
      }
    }
  }
  stats[STAT.aux] = aux;

  // b_dec: added to x_hat, and subtracted before the encoder.
  G.b_dec.set(code.dReconSum);
  const encoderSum = code.encoderSum ?? G.b_enc;
  for (let i = 0; i < n; i++) axpy(-encoderSum[i]!, P.W_enc, i * d, G.b_dec, 0, d);

  stats[STAT.gradNorm] = Math.sqrt(paramsOf(spec.recipe).reduce((a, p) => a + sumSq(G[p]!), 0));
  return { loss: (code.sse + code.prefix) / B + aux + code.penalty, stats, fires: code.fires, grads: G, frozen: fixed };
}

interface CodeResult {
  /** [B, d] x_hat - x_norm of the whole dictionary. */
  err: Float64Array;
  sse: number;
  prefix: number;
  penalty: number;
  aux: number;
  minAct: number;
  fires: Float64Array;
  /** [d] dL/dx_hat summed over tokens (and prefixes). */
  dReconSum: Float64Array;
  /** [n] sum over tokens of dL/d(x_cent . W_enc_i) where it differs from b_enc's gradient. */
  encoderSum?: Float64Array;
}

/** TopK, BatchTopK, Matryoshka and ReLU: their forward, and gradients into G. */
function sparseCode(
  spec: StepSpec,
  P: Params64,
  xNorm: Float64Array,
  xCent: Float64Array,
  pre: Float64Array,
  decNorm: Float64Array,
  sc: StepScalars,
  G: Params64,
): CodeResult {
  const { batchSize: B, dModel: d, width: n } = spec;
  const { ranked, penalised, batchThreshold } = STEP_RECIPES[spec.recipe];
  const entries = select(spec, pre, ranked && !spec.unitNormDecoder ? decNorm : undefined, sc.k);
  const groups = spec.prefixes.length + 1;
  const groupOf = (i: number) => spec.prefixes.filter((p) => p <= i).length;
  const parts = Array.from({ length: groups }, () => new Float64Array(B * d)); // what each group adds
  const fires = new Float64Array(n);
  const actsSum = new Float64Array(n);
  let minAct = 0;
  for (const e of entries) {
    axpy(Math.max(e.value, 0), P.W_dec, e.latent * d, parts[groupOf(e.latent)]!, e.row * d, d);
    if (e.value > 0) {
      fires[e.latent]! += 1;
      actsSum[e.latent]! += e.value;
      if (batchThreshold && (minAct === 0 || e.score < minAct)) minAct = e.score;
    }
  }
  // Prefix g reconstructs with groups 0..g.
  const errs: Float64Array[] = [];
  const running = new Float64Array(B * d);
  for (let b = 0; b < B; b++) running.set(P.b_dec, b * d);
  for (const part of parts) {
    for (let i = 0; i < B * d; i++) running[i]! += part[i]!;
    errs.push(running.map((v, i) => v - xNorm[i]!));
  }
  const err = errs.at(-1)!;
  const sse = sumSq(err);
  const prefix = errs.slice(0, -1).reduce((a, e) => a + sumSq(e), 0);
  const l1 = penalised ? sc.sparsityCoef / B : 0;
  const penalty = actsSum.reduce((a, s, i) => a + s * decNorm[i]!, 0) * l1;

  // dL/d(group g's part) sums the errors of every prefix that holds group g.
  const dPart = errs.map(() => new Float64Array(B * d));
  for (let g = groups - 1; g >= 0; g--) {
    for (let i = 0; i < B * d; i++) dPart[g]![i] = (2 / B) * errs[g]![i]! + (g + 1 < groups ? dPart[g + 1]![i]! : 0);
  }
  for (const e of entries) {
    if (!(e.value > 0)) continue;
    const dRecon = dPart[groupOf(e.latent)]!;
    const dAct = dot(dRecon, e.row * d, P.W_dec, e.latent * d, d) + l1 * decNorm[e.latent]!;
    axpy(e.value, dRecon, e.row * d, G.W_dec, e.latent * d, d);
    axpy(dAct, xCent, e.row * d, G.W_enc, e.latent * d, d);
    G.b_enc[e.latent]! += dAct;
  }
  if (l1 > 0) for (let i = 0; i < n; i++) axpy((l1 * actsSum[i]!) / Math.max(decNorm[i]!, 1e-12), P.W_dec, i * d, G.W_dec, i * d, d);
  const dReconSum = new Float64Array(d);
  for (let b = 0; b < B; b++) axpy(1, dPart[0]!, b * d, dReconSum, 0, d);
  return { err, sse, prefix, penalty, aux: 0, minAct, fires, dReconSum };
}

/** Gated: gate 1[pre > 0], magnitude relu(enc * exp(r_mag) + b_mag), penalty and frozen-decoder auxiliary loss. */
function gatedCode(
  spec: StepSpec,
  P: Params64,
  xNorm: Float64Array,
  xCent: Float64Array,
  enc: Float64Array,
  pre: Float64Array,
  decNorm: Float64Array,
  sc: StepScalars,
  fixed: Frozen,
  G: Params64,
): CodeResult {
  const { batchSize: B, dModel: d, width: n } = spec;
  const rMag = P.r_mag!;
  const bMag = P.b_mag!;
  G.r_mag = new Float64Array(n);
  G.b_mag = new Float64Array(n);
  const expR = rMag.map(Math.exp);
  const mag = enc.map((v, i) => v * expR[i % n]! + bMag[i % n]!);
  const f = mag.map((v, i) => (pre[i]! > 0 && v > 0 ? v : 0));
  const xHat = new Float64Array(B * d);
  const viaGate = new Float64Array(B * d);
  for (let b = 0; b < B; b++) {
    xHat.set(P.b_dec, b * d);
    viaGate.set(fixed.b_dec, b * d);
    for (let i = 0; i < n; i++) {
      if (f[b * n + i]! > 0) axpy(f[b * n + i]!, P.W_dec, i * d, xHat, b * d, d);
      if (pre[b * n + i]! > 0) axpy(pre[b * n + i]!, fixed.W_dec, i * d, viaGate, b * d, d);
    }
  }
  const err = xHat.map((v, i) => v - xNorm[i]!);
  const gateErr = viaGate.map((v, i) => v - xNorm[i]!);
  const l1 = sc.sparsityCoef / B;
  const fires = new Float64Array(n);
  const gateSum = new Float64Array(n);
  const encoderSum = new Float64Array(n);
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < n; i++) {
      const at = b * n + i;
      if (f[at]! > 0) {
        fires[i]! += 1;
        const dMag = (2 / B) * dot(err, b * d, P.W_dec, i * d, d);
        axpy((2 / B) * f[at]!, err, b * d, G.W_dec, i * d, d);
        G.b_mag[i]! += dMag;
        G.r_mag[i]! += dMag * enc[at]! * expR[i]!;
        encoderSum[i]! += dMag * expR[i]!;
        axpy(dMag * expR[i]!, xCent, b * d, G.W_enc, i * d, d);
      }
      if (pre[at]! > 0) {
        gateSum[i]! += pre[at]!;
        const dPre = (2 / B) * dot(gateErr, b * d, fixed.W_dec, i * d, d) + l1 * decNorm[i]!;
        G.b_enc[i]! += dPre;
        encoderSum[i]! += dPre;
        axpy(dPre, xCent, b * d, G.W_enc, i * d, d);
      }
    }
  }
  for (let i = 0; i < n; i++) axpy((l1 * gateSum[i]!) / Math.max(decNorm[i]!, 1e-12), P.W_dec, i * d, G.W_dec, i * d, d);
  const dReconSum = new Float64Array(d);
  for (let b = 0; b < B; b++) axpy(2 / B, err, b * d, dReconSum, 0, d);
  return {
    err,
    sse: sumSq(err),
    prefix: 0,
    penalty: gateSum.reduce((a, s, i) => a + s * decNorm[i]!, 0) * l1,
    aux: sumSq(gateErr) / B,
    minAct: 0,
    fires,
    dReconSum,
    encoderSum,
  };
}

/**
 * JumpReLU trained directly, as graph/jumprelu.ts computes it: f = pre * 1[pre > t], t = relu(theta);
 * the sparsity penalty (L0 or tanh) and the pre-activation loss on dead latents; the thresholds'
 * straight-through gradients, with K((pre - t) / eps) taken as |pre - t| < eps / 2.
 */
function thresholdCode(
  spec: StepSpec,
  P: Params64,
  xNorm: Float64Array,
  xCent: Float64Array,
  pre: Float64Array,
  decNorm: Float64Array,
  sc: StepScalars,
  G: Params64,
): CodeResult {
  const { batchSize: B, dModel: d, width: n } = spec;
  const { bandwidth: eps, sparsityLoss, tanhScale, preActLoss } = spec.jumpRelu ?? JUMPRELU_DEFAULTS;
  const theta = P.threshold!;
  const t = theta.map((v) => Math.max(v, 0));
  const coef = sc.sparsityCoef / B;
  const mu = preActLoss ? sc.preActCoef / B : 0;
  const dead = new Set(sc.deadIdx);
  const f = pre.map((v, i) => (v > t[i % n]! ? v : 0));
  const xHat = new Float64Array(B * d);
  const fires = new Float64Array(n);
  for (let b = 0; b < B; b++) {
    xHat.set(P.b_dec, b * d);
    for (let i = 0; i < n; i++) {
      if (pre[b * n + i]! > t[i]!) {
        fires[i]! += 1;
        axpy(f[b * n + i]!, P.W_dec, i * d, xHat, b * d, d);
      }
    }
  }
  const err = xHat.map((v, i) => v - xNorm[i]!);
  const dT = new Float64Array(n);
  const dNorm = new Float64Array(n);
  G.threshold = new Float64Array(n);
  let penalty = 0;
  let aux = 0;
  for (let b = 0; b < B; b++) {
    for (let i = 0; i < n; i++) {
      const at = b * n + i;
      let dF = (2 / B) * dot(err, b * d, P.W_dec, i * d, d);
      if (sparsityLoss === "tanh") {
        const th = Math.tanh(tanhScale * f[at]! * decNorm[i]!);
        penalty += coef * th;
        dF += coef * tanhScale * decNorm[i]! * (1 - th * th);
        dNorm[i]! += coef * tanhScale * (1 - th * th) * f[at]!;
      } else if (pre[at]! > t[i]!) {
        penalty += coef;
      }
      const near = Math.abs(pre[at]! - t[i]!) < eps / 2;
      if (near) dT[i]! += -(t[i]! / eps) * dF - (sparsityLoss === "step" ? coef / eps : 0);
      let dPre = 0;
      if (pre[at]! > t[i]!) {
        dPre = dF;
        axpy((2 / B) * f[at]!, err, b * d, G.W_dec, i * d, d);
      }
      if (mu > 0 && dead.has(i) && t[i]! > pre[at]!) {
        aux += mu * (t[i]! - pre[at]!) * decNorm[i]!;
        dPre -= mu * decNorm[i]!;
        dT[i]! += mu * decNorm[i]!;
        dNorm[i]! += mu * (t[i]! - pre[at]!);
      }
      if (dPre !== 0) {
        G.b_enc[i]! += dPre;
        axpy(dPre, xCent, b * d, G.W_enc, i * d, d);
      }
    }
  }
  for (let i = 0; i < n; i++) {
    G.threshold[i] = theta[i]! > 0 ? dT[i]! : 0;
    if (dNorm[i] !== 0) axpy(dNorm[i]! / Math.max(decNorm[i]!, 1e-12), P.W_dec, i * d, G.W_dec, i * d, d);
  }
  const dReconSum = new Float64Array(d);
  for (let b = 0; b < B; b++) axpy(2 / B, err, b * d, dReconSum, 0, d);
  return { err, sse: sumSq(err), prefix: 0, penalty, aux, minAct: 0, fires, dReconSum };
}

export const toParams64 = (s: SaeState, recipe: StepSpec["recipe"] = "topk"): Params64 =>
  Object.fromEntries(paramsOf(recipe).map((p) => [p, Float64Array.from(stateTensor(s, p))])) as Params64;

/** torch.nn.utils.clip_grad_norm_'s factor: gradients are scaled by it before Adam. */
export const clipFactor = (gradNorm: number, maxNorm: number): number => (maxNorm > 0 ? Math.min(1, maxNorm / (gradNorm + 1e-6)) : 1);

/** One full step: gradients, clipping, Adam with bias correction, decoder renormalisation. */
export function referenceStep(
  spec: StepSpec,
  state: SaeState,
  x: Float32Array,
  sc: StepScalars,
): { next: SaeState; evaluation: Evaluation } {
  const { dModel: d, width: n } = spec;
  const evaluation = evaluate(spec, toParams64(state, spec.recipe), x, sc);
  const clip = clipFactor(evaluation.stats[STAT.gradNorm]!, spec.gradClipNorm);
  const next: Partial<Record<string, Float32Array>> = {};
  const bc1 = 1 - spec.beta1 ** sc.t;
  const sqrtBc2 = Math.sqrt(1 - spec.beta2 ** sc.t);
  for (const p of paramsOf(spec.recipe)) {
    const g = evaluation.grads[p]!.map((v) => v * clip);
    const m = Float32Array.from(stateTensor(state, `m_${p}`), (v, i) => spec.beta1 * v + (1 - spec.beta1) * g[i]!);
    const v = Float32Array.from(stateTensor(state, `v_${p}`), (v, i) => spec.beta2 * v + (1 - spec.beta2) * g[i]! * g[i]!);
    next[p] = Float32Array.from(stateTensor(state, p), (w, i) => w - (sc.lr / bc1) * (m[i]! / (Math.sqrt(v[i]!) / sqrtBc2 + spec.eps)));
    next[`m_${p}`] = m;
    next[`v_${p}`] = v;
  }
  const out = next as SaeState;
  if (spec.unitNormDecoder) {
    for (let i = 0; i < n; i++) {
      const row = out.W_dec.subarray(i * d, (i + 1) * d);
      const norm = Math.max(Math.sqrt(row.reduce((a, v) => a + v * v, 0)), 1e-12);
      for (let j = 0; j < d; j++) row[j]! /= norm;
    }
  }
  return { next: out, evaluation };
}
