import { addAuxK } from "./auxk.js";
import { F16, F32, GraphBuilder, I64 } from "./builder.js";
import { batchTopKCode, type Code, type CodeGrads, reluCode, topKCode } from "./codes.js";

/** The recipes a step graph trains; JumpReLU trains as TopK and is converted afterwards. */
export type StepRecipe = "topk" | "batchtopk" | "relu";

export interface StepSpec {
  recipe: StepRecipe;
  /** Rows per step B. */
  batchSize: number;
  /** Model width d. */
  dModel: number;
  /** Latents n. */
  width: number;
  /** Active latents per token (topk, batchtopk). */
  k: number;
  /** Element type of the fed batch; fp16 is cast inside the graph. */
  input: "fp32" | "fp16";
  beta1: number;
  beta2: number;
  eps: number;
  /** Rescale decoder rows to unit norm after each update. */
  unitNormDecoder: boolean;
  /** Add the AuxK term (topk, batchtopk). */
  auxK: boolean;
  /** Also output the gradients (gradient checks). */
  gradOutputs?: boolean;
}

/** Trained tensors, in state order. */
export const PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec"] as const;
export type ParamName = (typeof PARAMS)[number];
/** Every state tensor the step reads and writes: parameters, then Adam's first and second moments. */
export const STATE = [...PARAMS, ...PARAMS.map((p) => `m_${p}` as const), ...PARAMS.map((p) => `v_${p}` as const)] as const;
export type StateName = (typeof STATE)[number];
export const nextName = (s: StateName) => `next_${s}` as const;

/** Layout of the `stats` output. */
export const STAT = { sse: 0, variance: 1, aux: 2, penalty: 3, minAct: 4 } as const;
export const STAT_COUNT = 5;

export function stateShape(name: StateName, n: number, d: number): number[] {
  const p = name.replace(/^[mv]_/, "") as ParamName;
  return p === "b_enc" ? [n] : p === "b_dec" ? [d] : [n, d];
}

/**
 * One whole training step as one ONNX graph: forward, hand-derived backward, Adam with bias
 * correction, decoder renormalisation. State goes in and the next state comes out, so the caller
 * can swap two sets of buffers.
 *
 * Inputs: x [B, d]; scale []; lr_step [] = lr / (1 - beta1^t); sqrt_bc2 [] = sqrt(1 - beta2^t);
 * l1_coef [] (relu); dead_idx [m], aux_k [1], aux_scale [] (auxK); the 12 state tensors.
 * Outputs: next_<state>; stats [5] (see STAT); fires [n]; grad_<param> when gradOutputs.
 */
export function buildStepGraph(spec: StepSpec): Uint8Array {
  const { batchSize: B, dModel: d, width: n, k } = spec;
  const g = new GraphBuilder(`sae_step_${spec.recipe}`);

  const xIn = g.input("x", spec.input === "fp16" ? F16 : F32, [B, d]);
  const scale = g.input("scale", F32, []);
  const lrStep = g.input("lr_step", F32, []);
  const sqrtBc2 = g.input("sqrt_bc2", F32, []);
  const l1Coef = spec.recipe === "relu" ? g.input("l1_coef", F32, []) : "";
  const aux = spec.auxK && spec.recipe !== "relu";
  const deadIdx = aux ? g.input("dead_idx", I64, ["m"]) : "";
  const auxK = aux ? g.input("aux_k", I64, [1]) : "";
  const auxScale = aux ? g.input("aux_scale", F32, []) : "";
  const s = Object.fromEntries(STATE.map((name) => [name, g.input(name, F32, stateShape(name, n, d))])) as Record<StateName, string>;

  // Forward.
  const x = spec.input === "fp16" ? g.cast(xIn, F32, "x_f32") : xIn; // [B, d]
  const xNorm = g.mul(x, scale, "x_norm"); // [B, d] dataset-wide normalisation
  const xCent = g.sub(xNorm, s.b_dec, "x_cent"); // [B, d]
  const pre = g.gemm(xCent, s.W_enc, { bias: s.b_enc, transB: true }, "pre"); // [B,d]@[d,n] -> [B, n], the one dense GEMM
  const inputs = { B, d, n, k, pre, W_dec: s.W_dec };
  const code: Code = spec.recipe === "topk" ? topKCode(g, inputs) : spec.recipe === "batchtopk" ? batchTopKCode(g, inputs) : reluCode(g, inputs, l1Coef);
  const xHat = g.add(code.recon, s.b_dec, "x_hat"); // [B, d]
  const err = g.sub(xHat, xNorm, "err"); // [B, d]
  const sse = g.reduceSumSquare(err, [], "sse"); // [] loss = sse / B + aux + penalty

  // Backward.
  const dRecon = g.mul(err, g.constF(2 / B), "d_recon"); // [B, d] dL/dx_hat
  let grads: CodeGrads = code.backward(dRecon, xCent);
  let auxLoss = g.constF(0);
  if (aux) {
    ({ loss: auxLoss, grads } = addAuxK(g, { pre, xCent, err, W_dec: s.W_dec, deadIdx, auxK, auxScale }, grads));
  }
  // b_dec enters twice: added to x_hat, and subtracted from x before the encoder, where its gradient is
  // -sum_b dL/dx_cent[b] = -(sum_b dL/dpre[b]) @ W_enc = -g_b_enc @ W_enc.
  const viaEncoder = g.reshape(g.matmul(g.reshape(grads.b_enc, [1, n]), s.W_enc), [d]); // [1,n]@[n,d] -> [d]
  const gBDec = g.sub(g.reduceSum(dRecon, [0]), viaEncoder, "g_b_dec"); // [d]
  const gradOf: Record<ParamName, string> = { W_enc: grads.W_enc, b_enc: grads.b_enc, W_dec: grads.W_dec, b_dec: gBDec };

  // Adam with bias correction, as torch.optim.Adam computes it.
  const b1 = g.constF(spec.beta1);
  const b2 = g.constF(spec.beta2);
  const oneMinusB1 = g.constF(1 - spec.beta1);
  const oneMinusB2 = g.constF(1 - spec.beta2);
  const eps = g.constF(spec.eps);
  const next: Record<string, string> = {};
  for (const p of PARAMS) {
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
  for (const name of STATE) g.output(next[name]!, nextName(name), F32, stateShape(name, n, d));
  const variance = g.reduceSumSquare(g.sub(xNorm, g.op("ReduceMean", [xNorm, g.constI([0])], { keepdims: 1 })), [], "variance"); // []
  g.output(g.stack([sse, variance, auxLoss, code.penalty, code.minAct], "stats"), "stats", F32, [STAT_COUNT]);
  g.output(code.fires, "fires", F32, [n]);
  if (spec.gradOutputs) for (const p of PARAMS) g.output(gradOf[p], `grad_${p}`, F32, stateShape(p, n, d));
  return g.build();
}
