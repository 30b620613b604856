import { F32, type GraphBuilder } from "./builder.js";
import type { Code } from "./codes.js";

export interface GatedInputs {
  B: number;
  n: number;
  /** [B, n] x_cent @ W_enc^T, shared by both paths. */
  enc: string;
  /** [B, n] enc + b_enc: the gate's pre-activation pi_gate (b_enc is SAELens' b_gate). */
  pre: string;
  W_dec: string; // [n, d]
  /** [n] log-scale of the magnitude path's encoder rows. */
  r_mag: string;
  b_mag: string; // [n]
  b_dec: string; // [d]
  /** [B, d] the normalised input the auxiliary reconstruction fits. */
  xNorm: string;
  /** [n, 1] decoder-row norms. */
  decNormKeep: string;
  /** [] sparsity weight lambda. */
  l1Coef: string;
}

/**
 * Gated SAE (Rajamanoharan et al. 2024), as SAELens trains it: the gate decides which latents fire,
 * 1[pi_gate > 0], and the magnitude path, sharing W_enc rescaled by exp(r_mag), says how strongly,
 * f = 1[pi_gate > 0] * relu(enc * exp(r_mag) + b_mag). The Heaviside passes no gradient, so the gate
 * learns from the other two terms:
 *
 *   L = |x - x_hat(f)|^2 + lambda * sum_i relu(pi_gate)_i |W_dec_i| + |x - (relu(pi_gate) @ W_dec' + b_dec')|^2
 *
 * per token, where W_dec' and b_dec' are frozen copies: the auxiliary reconstruction trains the gate
 * to reconstruct without pulling the decoder toward it. Every product is dense.
 */
export function gatedCode(g: GraphBuilder, s: GatedInputs): Code {
  const { B, n } = s;
  const zero = g.constF(0);
  const expR = g.exp(s.r_mag, "exp_r_mag"); // [n]
  const mag = g.add(g.mul(s.enc, expR), s.b_mag, "mag_pre"); // [B, n] pi_mag
  const gate = g.cast(g.greater(s.pre, zero), F32, "gate"); // [B, n]
  const active = g.mul(gate, g.cast(g.greater(mag, zero), F32), "active"); // [B, n]
  const acts = g.mul(gate, g.relu(mag), "acts"); // [B, n] f
  const recon = g.matmul(acts, s.W_dec, "recon"); // [B,n]@[n,d] -> [B, d]
  const decNorm = g.reshape(s.decNormKeep, [n]); // [n]
  const coef = g.div(s.l1Coef, g.constF(B), "l1_per_token"); // [] the penalty is a mean over tokens
  const gateActs = g.relu(s.pre, "gate_acts"); // [B, n] relu(pi_gate)
  const gateSum = g.reduceSum(gateActs, [0], "gate_sum"); // [n]
  const penalty = g.mul(g.reduceSum(g.mul(gateSum, decNorm), []), coef, "l1_penalty"); // []
  const auxErr = g.sub(g.add(g.matmul(gateActs, s.W_dec), s.b_dec), s.xNorm, "gate_err"); // [B, d] via-gate reconstruction error
  const aux = g.mul(g.reduceSumSquare(auxErr, []), g.constF(1 / B), "gate_aux_loss"); // []
  return {
    recon,
    fires: g.reduceSum(active, [0], "fires"), // [n]
    minAct: g.constF(0),
    penalty,
    aux,
    backward(dRecon, xCent) {
      const dMag = g.mul(g.gemm(dRecon, s.W_dec, { transB: true }), active, "d_mag"); // [B,d]@[d,n] -> [B, n] through f
      const dGate = g.add(g.gemm(g.mul(auxErr, g.constF(2 / B)), s.W_dec, { transB: true }), g.mul(decNorm, coef)); // [B, n] aux + penalty
      const dPre = g.mul(dGate, gate, "d_pre"); // [B, n] through relu(pi_gate)
      const dEnc = g.add(dPre, g.mul(dMag, expR), "d_enc"); // [B, n] both paths into x_cent @ W_enc^T
      const unitDec = g.div(s.W_dec, g.op("Max", [s.decNormKeep, g.constF(1e-12)])); // [n, d]
      const dDecNorm = g.mul(g.unsqueeze(g.mul(gateSum, coef), [1]), unitDec); // [n, d] penalty through |W_dec_i|
      return {
        W_dec: g.add(g.gemm(acts, dRecon, { transA: true }), dDecNorm, "g_W_dec"), // [n,B]@[B,d] -> [n, d]; aux's decoder is frozen
        W_enc: g.gemm(dEnc, xCent, { transA: true }, "g_W_enc"), // [n,B]@[B,d] -> [n, d]
        b_enc: g.reduceSum(dPre, [0], "g_b_enc"), // [n]
        r_mag: g.mul(g.reduceSum(g.mul(dMag, s.enc), [0]), expR, "g_r_mag"), // [n] d pi_mag / d r_mag = enc * exp(r_mag)
        b_mag: g.reduceSum(dMag, [0], "g_b_mag"), // [n]
        encoderSum: g.reduceSum(dEnc, [0]), // [n]
      };
    },
  };
}
