import { F32, type GraphBuilder } from "./builder.js";
import type { Code } from "./codes.js";

/** The terms of a JumpReLU trained directly, as SAELens' JumpReLUTrainingSAEConfig names them. */
export interface JumpReluSpec {
  /** Width eps of the rectangle kernel of the thresholds' straight-through gradients (jumprelu_bandwidth). */
  bandwidth: number;
  /** step: the L0 (Google DeepMind's); tanh: sum_i tanh(tanhScale * f_i * |W_dec_i|) (Anthropic's) (jumprelu_sparsity_loss_mode). */
  sparsityLoss: "step" | "tanh";
  /** The scale inside the tanh (jumprelu_tanh_scale). */
  tanhScale: number;
  /** Adds the pre-activation loss on dead latents, weighted by the fed pre_act_coef (pre_act_loss_coefficient). */
  preActLoss: boolean;
}

/** SAELens' defaults, with the pre-activation loss off as its None says. */
export const JUMPRELU_DEFAULTS: JumpReluSpec = { bandwidth: 0.05, sparsityLoss: "step", tanhScale: 4, preActLoss: false };

export interface JumpReluInputs {
  B: number;
  n: number;
  /** [B, n] pre-activations. */
  pre: string;
  W_dec: string; // [n, d]
  /** [n] the trained threshold parameter theta; the threshold in use is relu(theta). */
  threshold: string;
  /** [n, 1] decoder-row norms; "" when no term needs them (step mode without the pre-activation loss). */
  decNormKeep: string;
  /** [] the sparsity penalty's weight this step (l0_coefficient, warmed up). */
  sparsityCoef: string;
  /** [] and [n]: the pre-activation loss's weight and the dead latents (1 dead, 0 alive); "" without that loss. */
  preActCoef: string;
  deadMask: string;
  spec: JumpReluSpec;
}

/** Whether the code reads decoder-row norms: the tanh penalty and the pre-activation loss weight by them. */
export const jumpReluNeedsNorms = (spec: JumpReluSpec) => spec.sparsityLoss === "tanh" || spec.preActLoss;

/**
 * JumpReLU trained directly (Rajamanoharan et al. 2024, "Jumping Ahead"), as SAELens' current
 * JumpReLUTrainingSAE does it: the threshold parameter theta is trained as it is (not its log) and
 * used as t = relu(theta), f = pre * 1[pre > t]. The step function passes no gradient to pre, so
 * theta learns through straight-through estimators with the rectangle kernel K(u) = 1[|u| < 1/2]:
 *
 *   dL/dt_i += -(t_i / eps) sum_b K((pre_bi - t_i) / eps) dL/df_bi         (the jump, of size t_i)
 *   dL/dt_i += -(lambda / (B eps)) sum_b K((pre_bi - t_i) / eps)          (step mode's L0)
 *
 * and dL/dtheta = dL/dt * 1[theta > 0]. Per token the loss adds, besides |x - x_hat|^2:
 * lambda * L0 (step) or lambda * sum_i tanh(c f_i |W_dec_i|) (tanh), and with the pre-activation
 * loss, mu * sum_{i dead} relu(t_i - pre_i) |W_dec_i|, which pulls a dead latent's pre-activation
 * up to its threshold. Every product is dense, as ReLU's are.
 */
export function jumpReluCode(g: GraphBuilder, s: JumpReluInputs): Code {
  const { B, n, spec } = s;
  const t = g.relu(s.threshold, "threshold_used"); // [n]
  const gate = g.cast(g.greater(s.pre, t, "above"), F32, "active"); // [B, n]
  const acts = g.mul(s.pre, gate, "acts"); // [B, n] f (a Mul: onnxruntime's CPU Where is several times slower)
  const recon = g.matmul(acts, s.W_dec, "recon"); // [B,n]@[n,d] -> [B, d]
  const fires = g.reduceSum(gate, [0], "fires"); // [n]
  const coef = g.div(s.sparsityCoef, g.constF(B), "l0_per_token"); // [] the penalty is a mean over tokens
  // K((pre - t) / eps) as |pre - t| < eps / 2: the tokens near each threshold, through which it learns.
  const near = g.cast(g.op("Less", [g.op("Abs", [g.sub(s.pre, t)]), g.constF(spec.bandwidth / 2)]), F32, "near"); // [B, n]
  const decNorm = s.decNormKeep ? g.reshape(s.decNormKeep, [n]) : ""; // [n]

  let penalty: string;
  let dActsTanh = ""; // [B, n] the tanh penalty's dL/df
  let dNormTanh = ""; // [n] its dL/d|W_dec_i|
  if (spec.sparsityLoss === "tanh") {
    const scaled = g.mul(decNorm, g.constF(spec.tanhScale), "tanh_weight"); // [n] c |W_dec_i|
    const th = g.op("Tanh", [g.mul(acts, scaled)], {}, "tanh_l0"); // [B, n]
    penalty = g.mul(g.reduceSum(th, []), coef, "l0_penalty"); // []
    const slope = g.mul(g.sub(g.constF(1), g.mul(th, th)), coef, "tanh_slope"); // [B, n] lambda/B (1 - tanh^2)
    dActsTanh = g.mul(slope, scaled, "d_acts_tanh"); // [B, n]
    dNormTanh = g.mul(g.reduceSum(g.mul(slope, acts), [0]), g.constF(spec.tanhScale), "d_norm_tanh"); // [n]
  } else {
    penalty = g.mul(g.reduceSum(fires, []), coef, "l0_penalty"); // []
  }

  let aux = g.constF(0);
  let below = ""; // [B, n] 1[t > pre] on dead latents' weights
  let preActWeight = ""; // [n] mu/B * dead_i * |W_dec_i|
  let dNormPreAct = ""; // [n]
  if (spec.preActLoss) {
    const shortfall = g.relu(g.sub(t, s.pre), "pre_act_shortfall"); // [B, n] relu(t - pre)
    const weight = g.mul(g.div(s.preActCoef, g.constF(B)), s.deadMask, "pre_act_dead"); // [n] mu/B on dead latents
    const shortSum = g.reduceSum(shortfall, [0], "pre_act_sum"); // [n]
    preActWeight = g.mul(weight, decNorm, "pre_act_weight"); // [n]
    aux = g.reduceSum(g.mul(shortSum, preActWeight), [], "pre_act_loss"); // []
    below = g.cast(g.greater(t, s.pre), F32, "pre_act_below"); // [B, n]
    dNormPreAct = g.mul(shortSum, weight, "d_norm_pre_act"); // [n]
  }

  return {
    recon,
    fires,
    minAct: g.constF(0),
    penalty,
    aux,
    backward(dRecon, xCent) {
      const dReconActs = g.gemm(dRecon, s.W_dec, { transB: true }, "d_recon_acts"); // [B,d]@[d,n] -> [B, n]
      const dActs = dActsTanh ? g.add(dReconActs, dActsTanh, "d_acts") : dReconActs; // [B, n] dL/df
      let dPre = g.mul(dActs, gate, "d_pre_code"); // [B, n] through f = pre * 1[pre > t], no STE into pre
      const nearSum = g.reduceSum(g.mul(near, dActs), [0]); // [n] sum_b K dL/df
      const minusInvEps = g.constF(-1 / spec.bandwidth);
      let dT = g.mul(g.mul(nearSum, t), minusInvEps, "d_t_jump"); // [n] -(t / eps) sum_b K dL/df
      if (spec.sparsityLoss === "step") {
        const perNear = g.mul(coef, minusInvEps); // [] -lambda / (B eps)
        dT = g.add(dT, g.mul(g.reduceSum(near, [0]), perNear), "d_t_l0"); // [n]
      }
      let dNorm = dNormTanh;
      if (spec.preActLoss) {
        dPre = g.sub(dPre, g.mul(below, preActWeight), "d_pre"); // [B, n]
        dT = g.add(dT, g.mul(g.reduceSum(below, [0]), preActWeight), "d_t_pre_act"); // [n]
        dNorm = dNorm ? g.add(dNorm, dNormPreAct) : dNormPreAct;
      }
      const dTheta = g.mul(dT, g.cast(g.greater(s.threshold, g.constF(0)), F32), "g_threshold"); // [n] through relu(theta)
      let gDec = g.gemm(acts, dRecon, { transA: true }, dNorm ? "g_W_dec_recon" : "g_W_dec"); // [n,B]@[B,d] -> [n, d]
      if (dNorm) {
        const unitDec = g.div(s.W_dec, g.op("Max", [s.decNormKeep, g.constF(1e-12)])); // [n, d]
        gDec = g.add(gDec, g.mul(g.unsqueeze(dNorm, [1]), unitDec), "g_W_dec"); // [n, d] the terms through |W_dec_i|
      }
      return {
        W_dec: gDec,
        W_enc: g.gemm(dPre, xCent, { transA: true }, "g_W_enc"), // [n,B]@[B,d] -> [n, d]
        b_enc: g.reduceSum(dPre, [0], "g_b_enc"), // [n]
        threshold: dTheta,
      };
    },
  };
}
