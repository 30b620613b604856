import { F32, type GraphBuilder } from "./builder.js";
import type { CodeGrads } from "./codes.js";

export interface AuxKInputs {
  pre: string; // [B, n]
  xCent: string; // [B, d]
  /** [B, d] x_hat - x_norm of the main code; AuxK fits its negation. */
  err: string;
  W_dec: string; // [n, d]
  /** [m] int64 ids of the dead latents (m >= 1; with none dead, one id and scale 0). */
  deadIdx: string;
  /** [1] int64 latents each token may use, <= m. */
  auxK: string;
  /** [] coefficient * min(dead / k_aux, 1); 0 switches the term off. */
  auxScale: string;
}

/**
 * AuxK (Gao et al. 2024): the residual the main code leaves is reconstructed by the top k_aux dead
 * latents, and that reconstruction's normalised error is added to the loss, giving dead latents a
 * gradient that revives them. Only the m dead latents take part, so its products cost B*m*d.
 *
 * Returns the loss term and adds its gradients into `grads`.
 */
export function addAuxK(g: GraphBuilder, s: AuxKInputs, grads: CodeGrads): { loss: string; grads: CodeGrads } {
  const preDead = g.gather(s.pre, s.deadIdx, 1, "aux_pre"); // [B, m]
  const [vals, idx] = g.opN("TopK", [preDead, s.auxK], 2, { axis: 1, largest: 1, sorted: 1 }, "aux_topk"); // [B, ka]
  const acts = g.relu(vals!); // [B, ka]
  // Zeros made by Expand, not ConstantOfShape, which onnxruntime's WebGPU provider lacks: [B, m] would cross from the CPU each step.
  const zeros = g.op("Expand", [g.constF(0), g.op("Shape", [preDead])], {}, "aux_zeros"); // [B, m]
  const codeDead = g.op("ScatterElements", [zeros, idx!, acts], { axis: 1 }, "aux_code"); // [B, m]
  const wDecDead = g.gather(s.W_dec, s.deadIdx, 0, "aux_w_dec"); // [m, d]
  const eHat = g.matmul(codeDead, wDecDead, "aux_recon"); // [B, d]
  const resid = g.add(eHat, s.err, "aux_resid"); // [B, d] e_hat - (x_norm - x_hat)
  // The residual's variance normalises the term so it stays O(1) as the main loss falls; both it and
  // the residual are constants to AuxK's gradient.
  const errMean = g.op("ReduceMean", [s.err, g.constI([0])], { keepdims: 1 }); // [1, d]
  const errVar = g.op("Max", [g.reduceSumSquare(g.sub(s.err, errMean), []), g.constF(1e-30)], {}, "aux_err_var"); // []
  const weight = g.div(s.auxScale, errVar, "aux_weight"); // []
  const loss = g.mul(g.reduceSumSquare(resid, []), weight, "aux_loss"); // []
  const dResid = g.mul(resid, g.mul(weight, g.constF(2))); // [B, d]
  const dCode = g.gemm(dResid, wDecDead, { transB: true }); // [B,d]@[d,m] -> [B, m]
  const dPreDead = g.mul(dCode, g.cast(g.greater(codeDead, g.constF(0)), F32), "aux_d_pre"); // [B, m] kept and positive only
  const rows = g.unsqueeze(s.deadIdx, [1], "dead_rows"); // [m, 1]: on the CPU under WebGPU (no int64 Unsqueeze there), where dead_idx is fed anyway
  const unique = { unique: true }; // the dead ids are distinct, so the adds may run on every thread
  return {
    loss,
    grads: {
      W_dec: g.scatterAdd(grads.W_dec, rows, g.gemm(codeDead, dResid, { transA: true }), "g_W_dec_aux", unique), // + [m,B]@[B,d]
      W_enc: g.scatterAdd(grads.W_enc, rows, g.gemm(dPreDead, s.xCent, { transA: true }), "g_W_enc_aux", unique), // + [m,B]@[B,d]
      b_enc: g.scatterAdd(grads.b_enc, rows, g.reduceSum(dPreDead, [0]), "g_b_enc_aux", unique), // + [m]
    },
  };
}
