import { type ParamName, STEP_RECIPES, type StepRecipe } from "../../common/config/recipes.js";
import { addAuxK } from "./auxk.js";
import { decodeHalfWords } from "./half.js";
import { F16, F32, GraphBuilder, I64, U32 } from "./builder.js";
import { batchTopKCode, type Code, type CodeGrads, type CodeInputs, maskedCode, reluCode, topKCode } from "./codes.js";
import { gatedCode } from "./gated.js";
import type { Stage } from "./stages.js";
import { JUMPRELU_DEFAULTS, jumpReluCode, jumpReluNeedsNorms, type JumpReluSpec } from "./jumprelu.js";

export type { CoreParam, GatedParam, JumpReluParam, ParamName, StepRecipe } from "../../common/config/recipes.js";
export type { JumpReluSpec } from "./jumprelu.js";
export type { Stage } from "./stages.js";

export interface StepSpec {
  recipe: StepRecipe;
  /** Rows per step B. */
  batchSize: number;
  /** Model width d. */
  dModel: number;
  /** Latents n. */
  width: number;
  /** Active latents per token (ranked recipes); with annealK, the largest k the graph is fed. */
  k: number;
  /** k is an input (`k`, [1] int64) fed every step, for Llama Scope's k annealing; the code is then dense. */
  annealK: boolean;
  /** matryoshka: nested prefix sizes, increasing and below width; empty otherwise. */
  prefixes: readonly number[];
  /**
   * Element type of the fed batch; fp16 is cast inside the graph; the -words forms are 16-bit rows
   * fed as pairs of raw words ([B, d/2] uint32, d even) and widened inside it (graph/half.ts).
   */
  input: "fp32" | "fp16" | "fp16-words" | "bf16-words";
  beta1: number;
  beta2: number;
  eps: number;
  /** Rescale decoder rows to unit norm after each update; when off, ranked codes rank by activation x decoder norm. */
  unitNormDecoder: boolean;
  /** Add the AuxK term (ranked recipes). */
  auxK: boolean;
  /** Scale the gradients so their global norm is at most this before Adam; 0 does not clip. */
  gradClipNorm: number;
  /** Also output the gradients Adam is given (gradient checks). */
  gradOutputs?: boolean;
  /** jumprelu_trained: the thresholds' kernel bandwidth and the sparsity terms; SAELens' defaults when absent. */
  jumpRelu?: JumpReluSpec;
  /**
   * Index arithmetic in int32, so that a GPU provider keeps it on the device (onnxruntime's WebGPU
   * provider has no int64 arithmetic); costs BatchTopK a B*n int32 table. Same results either way.
   */
  int32Index?: boolean;
}

/** A parameter and its Adam first and second moments. */
export type WithMoments<P extends string> = P | `m_${P}` | `v_${P}`;
export type StateName = WithMoments<ParamName>;
export const nextName = (s: StateName) => `next_${s}` as const;

export const paramsOf = (recipe: StepRecipe): readonly ParamName[] => STEP_RECIPES[recipe].params;

/** Every state tensor the step of `recipe` reads and writes: parameters, then Adam's first and second moments. */
export function stateOf(recipe: StepRecipe): StateName[] {
  const p = paramsOf(recipe);
  return [...p, ...p.map((x) => `m_${x}` as const), ...p.map((x) => `v_${x}` as const)];
}

/** Layout of the `stats` output. */
export const STAT = { sse: 0, variance: 1, aux: 2, penalty: 3, minAct: 4, prefix: 5, gradNorm: 6 } as const;
export const STAT_COUNT = 7;

export function stateShape(name: StateName, n: number, d: number): number[] {
  const p = name.replace(/^[mv]_/, "") as ParamName;
  return p === "W_enc" || p === "W_dec" ? [n, d] : p === "b_dec" ? [d] : [n];
}

/**
 * One whole training step as one ONNX graph: forward, hand-derived backward, gradient clipping,
 * Adam with bias correction, decoder renormalisation. State goes in and the next state comes out,
 * so the caller can swap two sets of buffers.
 *
 * Inputs: x [B, d] (or [B, d/2] uint32 word pairs); scale []; lr_step [] = lr / (1 - beta1^t); sqrt_bc2 [] = sqrt(1 - beta2^t);
 * sparsity_coef [] (relu, gated: L1; jumprelu_trained: L0); k [1] (annealK); dead_idx [m], aux_k [1], aux_scale [] (auxK);
 * pre_act_coef [], dead_mask [n] (jumprelu_trained's pre-activation loss); the state.
 * Outputs: next_<state>; stats [7] (see STAT); fires [n]; grad_<param> when gradOutputs.
 */
export function buildStepGraph(spec: StepSpec): Uint8Array {
  return stepBuilder(spec).build();
}

/**
 * The step graph of `spec` cut into stages for onnxruntime's CPU provider on more than one thread:
 * its scatter-adds over rows that may repeat (the sparse codes' gradients, BatchTopK's
 * reconstruction, firing counts) run alone on one thread, since the CPU kernel would lose adds to
 * a repeated row on several. Undefined for graphs without them (the dense codes), which run whole.
 */
export function buildStepStages(spec: StepSpec): Stage[] | undefined {
  return stepBuilder(spec).stages();
}

function stepBuilder(spec: StepSpec): GraphBuilder {
  const { batchSize: B, dModel: d, width: n, k, recipe } = spec;
  const words = spec.input === "fp16-words" ? "fp16" : spec.input === "bf16-words" ? "bf16" : undefined;
  if (words && d % 2 !== 0) throw new Error(`${words} batches go in as word pairs: dModel ${d} must be even`);
  const { ranked, penalised, magnitudePath, thresholded } = STEP_RECIPES[recipe];
  const jump = thresholded ? (spec.jumpRelu ?? JUMPRELU_DEFAULTS) : undefined;
  const g = new GraphBuilder(`sae_step_${recipe}`);

  const xIn = words ? g.input("x", U32, [B, d / 2]) : g.input("x", spec.input === "fp16" ? F16 : F32, [B, d]);
  const scale = g.input("scale", F32, []);
  const lrStep = g.input("lr_step", F32, []);
  const sqrtBc2 = g.input("sqrt_bc2", F32, []);
  const sparsityCoef = penalised || jump ? g.input("sparsity_coef", F32, []) : "";
  const preActCoef = jump?.preActLoss ? g.input("pre_act_coef", F32, []) : "";
  const deadMask = jump?.preActLoss ? g.input("dead_mask", F32, [n]) : "";
  const kIn = spec.annealK && ranked ? g.input("k", I64, [1]) : "";
  const aux = spec.auxK && ranked;
  const deadIdx = aux ? g.input("dead_idx", I64, ["m"]) : "";
  const auxK = aux ? g.input("aux_k", I64, [1]) : "";
  const auxScale = aux ? g.input("aux_scale", F32, []) : "";
  const state = stateOf(recipe);
  const s = Object.fromEntries(state.map((name) => [name, g.input(name, F32, stateShape(name, n, d))])) as Record<StateName, string>;

  // Forward.
  const x = words ? decodeHalfWords(g, xIn, B, d, words) : spec.input === "fp16" ? g.cast(xIn, F32, "x_f32") : xIn; // [B, d]
  const xNorm = g.mul(x, scale, "x_norm"); // [B, d] dataset-wide normalisation
  const xCent = g.sub(xNorm, s.b_dec, "x_cent"); // [B, d]
  const enc = magnitudePath ? g.gemm(xCent, s.W_enc, { transB: true }, "enc") : ""; // [B, n] shared by gated's two paths
  const pre = magnitudePath ? g.add(enc, s.b_enc, "pre") : g.gemm(xCent, s.W_enc, { bias: s.b_enc, transB: true }, "pre"); // [B,d]@[d,n] -> [B, n], the one dense GEMM
  const rankByNorm = ranked && !spec.unitNormDecoder;
  const normed = rankByNorm || penalised || (jump !== undefined && jumpReluNeedsNorms(jump));
  const decNormKeep = normed ? g.reduceL2Keep(s.W_dec, 1, "dec_norm") : ""; // [n, 1]
  const inputs: CodeInputs = {
    B,
    d,
    n,
    k,
    pre,
    W_dec: s.W_dec,
    rankNorm: rankByNorm ? g.reshape(decNormKeep, [n]) : "",
    prefixes: spec.prefixes,
    int32Index: spec.int32Index ?? false,
  };
  const code = codeOf(g, spec, inputs, { kIn, sparsityCoef, preActCoef, deadMask, decNormKeep, enc, xNorm, s });

  // Reconstruction loss: one, or one per nested prefix (G of them), summed.
  const G = spec.prefixes.length + 1;
  const twoOverB = g.constF(2 / B);
  let err: string; // [B, d] x_hat - x_norm of the whole dictionary
  let sse: string; // [] its squared norm
  let prefixSse: string; // [] the inner prefixes' squared errors
  let dRecon: string; // dL/d recon, recon's shape
  let dReconSum: string; // [d] summed over tokens (and prefixes): b_dec's decoder-side gradient
  if (G === 1) {
    err = g.sub(g.add(code.recon, s.b_dec, "x_hat"), xNorm, "err"); // [B, d]
    sse = g.reduceSumSquare(err, [], "sse"); // [] loss = sse / B + ...
    prefixSse = g.constF(0);
    dRecon = g.mul(err, twoOverB, "d_recon"); // [B, d]
    dReconSum = g.reduceSum(dRecon, [0]); // [d]
  } else {
    // Prefix g reconstructs with groups 0..g, so its error is a running sum over groups, and a
    // group's gradient sums the errors of every prefix that holds it: a reversed running sum.
    const errs = g.sub(g.add(g.op("CumSum", [code.recon, g.constI([0], [])]), s.b_dec), xNorm, "errs"); // [G, B, d]
    const sseOf = g.reduceSumSquare(errs, [1, 2], "sse_of_prefix"); // [G]
    sse = g.pick(sseOf, 0, G - 1, "sse"); // []
    prefixSse = g.sub(g.reduceSum(sseOf, []), sse, "prefix_sse"); // []
    err = g.pick(errs, 0, G - 1, "err"); // [B, d]
    dRecon = g.op("CumSum", [g.mul(errs, twoOverB), g.constI([0], [])], { reverse: 1 }, "d_recon"); // [G, B, d]
    dReconSum = g.reduceSum(g.pick(dRecon, 0, 0), [0]); // [d]
  }

  // Backward.
  let grads: CodeGrads = code.backward(dRecon, xCent);
  let auxLoss = code.aux;
  if (aux) {
    let auxKLoss: string;
    ({ loss: auxKLoss, grads } = addAuxK(g, { pre, xCent, err, W_dec: s.W_dec, deadIdx, auxK, auxScale }, grads));
    auxLoss = g.add(auxLoss, auxKLoss, "aux_loss");
  }
  // b_dec enters twice: added to x_hat, and subtracted from x before the encoder, where its gradient is
  // -sum_b dL/dx_cent[b] = -(sum_b dL/d(x_cent W_enc^T)[b]) @ W_enc.
  const viaEncoder = g.reshape(g.matmul(g.reshape(grads.encoderSum ?? grads.b_enc, [1, n]), s.W_enc), [d]); // [1,n]@[n,d] -> [d]
  const raw: Partial<Record<ParamName, string>> = { ...grads, b_dec: g.sub(dReconSum, viaEncoder, "g_b_dec") };
  const params = paramsOf(recipe);
  const gradOf = Object.fromEntries(params.map((p) => [p, raw[p]!])) as Record<ParamName, string>;

  // Global gradient norm, and clipping to it as torch.nn.utils.clip_grad_norm_ does.
  const gradNorm = g.sqrt(
    params.map((p) => g.reduceSumSquare(gradOf[p], [])).reduce((a, b) => g.add(a, b)),
    "grad_norm",
  ); // []
  if (spec.gradClipNorm > 0) {
    const factor = g.op("Min", [g.constF(1), g.div(g.constF(spec.gradClipNorm), g.add(gradNorm, g.constF(1e-6)))], {}, "clip_factor"); // []
    for (const p of params) gradOf[p] = g.mul(gradOf[p], factor, `clipped_${p}`);
  }

  // Adam with bias correction, as torch.optim.Adam computes it.
  const b1 = g.constF(spec.beta1);
  const b2 = g.constF(spec.beta2);
  const oneMinusB1 = g.constF(1 - spec.beta1);
  const oneMinusB2 = g.constF(1 - spec.beta2);
  const eps = g.constF(spec.eps);
  const next: Partial<Record<StateName, string>> = {};
  for (const p of params) {
    const grad = gradOf[p];
    const m = g.add(g.mul(s[`m_${p}`], b1), g.mul(grad, oneMinusB1), `next_m_${p}`); // m = b1 m + (1-b1) g
    const v = g.add(g.mul(s[`v_${p}`], b2), g.mul(g.mul(grad, grad), oneMinusB2), `next_v_${p}`); // v = b2 v + (1-b2) g^2
    const denom = g.add(g.div(g.sqrt(v), sqrtBc2), eps); // sqrt(v / (1-b2^t)) + eps
    const renorm = p === "W_dec" && spec.unitNormDecoder;
    next[p] = g.sub(s[p], g.mul(g.div(m, denom), lrStep), renorm ? "updated_W_dec" : `next_${p}`); // p -= lr / (1-b1^t) * m / denom
    next[`m_${p}`] = m;
    next[`v_${p}`] = v;
  }

  // Decoder rows back to unit norm.
  if (spec.unitNormDecoder) {
    const norm = g.op("Max", [g.reduceL2Keep(next.W_dec!, 1), g.constF(1e-12)]); // [n, 1]
    next.W_dec = g.div(next.W_dec!, norm, "next_W_dec"); // [n, d]
  }

  // Outputs.
  for (const name of state) g.output(next[name]!, nextName(name), F32, stateShape(name, n, d));
  const variance = g.reduceSumSquare(g.sub(xNorm, g.op("ReduceMean", [xNorm, g.constI([0])], { keepdims: 1 })), [], "variance"); // []
  g.output(g.stack([sse, variance, auxLoss, code.penalty, code.minAct, prefixSse, gradNorm], "stats"), "stats", F32, [STAT_COUNT]);
  g.output(code.fires, "fires", F32, [n]);
  if (spec.gradOutputs) for (const p of params) g.output(gradOf[p], `grad_${p}`, F32, stateShape(p, n, d));
  return g;
}

/** The code of the spec's recipe. */
function codeOf(
  g: GraphBuilder,
  spec: StepSpec,
  inputs: CodeInputs,
  extra: {
    kIn: string;
    sparsityCoef: string;
    preActCoef: string;
    deadMask: string;
    decNormKeep: string;
    enc: string;
    xNorm: string;
    s: Record<StateName, string>;
  },
): Code {
  const { kIn, sparsityCoef, decNormKeep, s } = extra;
  switch (spec.recipe) {
    case "topk":
      return spec.annealK ? maskedCode(g, inputs, { batch: false, kIn }) : topKCode(g, inputs);
    case "batchtopk":
    case "matryoshka":
      return spec.annealK ? maskedCode(g, inputs, { batch: true, kIn }) : batchTopKCode(g, inputs);
    case "relu":
      return reluCode(g, inputs, sparsityCoef, decNormKeep);
    case "gated":
      return gatedCode(g, {
        B: inputs.B,
        n: inputs.n,
        enc: extra.enc,
        pre: inputs.pre,
        W_dec: s.W_dec,
        r_mag: s.r_mag,
        b_mag: s.b_mag,
        b_dec: s.b_dec,
        xNorm: extra.xNorm,
        decNormKeep,
        l1Coef: sparsityCoef,
      });
    case "jumprelu_trained":
      return jumpReluCode(g, {
        B: inputs.B,
        n: inputs.n,
        pre: inputs.pre,
        W_dec: s.W_dec,
        threshold: s.threshold,
        decNormKeep,
        sparsityCoef,
        preActCoef: extra.preActCoef,
        deadMask: extra.deadMask,
        spec: spec.jumpRelu ?? JUMPRELU_DEFAULTS,
      });
  }
}
