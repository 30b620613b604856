import { F32, type GraphBuilder } from "./builder.js";

/**
 * The sparse code of each recipe: which latents fire for each token, the reconstruction they make,
 * and the gradients of the reconstruction back into the SAE's weights. B tokens, d model width,
 * n latents, k active latents per token.
 */
export interface CodeInputs {
  B: number;
  d: number;
  n: number;
  k: number;
  /** [B, n] pre-activations x_cent @ W_enc^T + b_enc. */
  pre: string;
  /** [n, d] decoder, latent-major. */
  W_dec: string;
}

export interface CodeGrads {
  W_enc: string; // [n, d]
  W_dec: string; // [n, d]
  b_enc: string; // [n]
}

export interface Code {
  /** [B, d] sum over active latents of act * W_dec row (no bias). */
  recon: string;
  /** [n] tokens each latent fired on in this batch. */
  fires: string;
  /** [] smallest positive activation kept (BatchTopK's inference threshold); 0 where unused. */
  minAct: string;
  /** [] sparsity penalty added to the loss; 0 where the recipe has none. */
  penalty: string;
  /** Gradients given dL/d recon [B, d] and x_cent [B, d]. */
  backward(dRecon: string, xCent: string): CodeGrads;
}

/**
 * TopK: each token keeps its k largest pre-activations (ReLU'd). The decoder is a Gather of the k
 * active rows and every weight gradient is a ScatterND-add of B*k rows, so the encoder GEMM stays
 * the only dense product.
 */
export function topKCode(g: GraphBuilder, s: CodeInputs): Code {
  const { B, d, n, k } = s;
  const [vals, idx] = g.opN("TopK", [s.pre, g.constI([k])], 2, { axis: 1, largest: 1, sorted: 1 }, "topk"); // [B, k], [B, k]
  const acts = g.relu(vals!, "acts"); // [B, k]
  const active = g.cast(g.greater(vals!, g.constF(0)), F32, "active"); // [B, k] 1 where the latent fires
  const rows = g.reshape(idx!, [B * k, 1], "active_rows"); // [B*k, 1]
  const wDecSel = g.gather(s.W_dec, idx!, 0, "w_dec_sel"); // [B, k, d]
  const recon = g.reshape(g.matmul(g.unsqueeze(acts, [1]), wDecSel), [B, d], "recon"); // [B,1,k]@[B,k,d] -> [B, d]
  const fires = g.scatterAdd(g.zeros([n]), rows, g.reshape(active, [B * k]), "fires"); // [n]
  return {
    recon,
    fires,
    minAct: g.constF(0),
    penalty: g.constF(0),
    backward(dRecon, xCent) {
      const dActs = g.reshape(g.matmul(wDecSel, g.unsqueeze(dRecon, [2])), [B, k], "d_acts"); // [B,k,d]@[B,d,1] -> [B, k]
      const dVals = g.mul(dActs, active, "d_vals"); // [B, k] through the ReLU
      const decUpd = g.reshape(g.mul(g.unsqueeze(acts, [2]), g.unsqueeze(dRecon, [1])), [B * k, d]); // [B*k, d]
      const encUpd = g.reshape(g.mul(g.unsqueeze(dVals, [2]), g.unsqueeze(xCent, [1])), [B * k, d]); // [B*k, d]
      return {
        W_dec: g.scatterAdd(g.zeros([n, d]), rows, decUpd, "g_W_dec"), // [n, d]
        W_enc: g.scatterAdd(g.zeros([n, d]), rows, encUpd, "g_W_enc"), // [n, d]
        b_enc: g.scatterAdd(g.zeros([n]), rows, g.reshape(dVals, [B * k]), "g_b_enc"), // [n]
      };
    },
  };
}

/**
 * BatchTopK: the batch keeps its B*k largest ReLU'd pre-activations, so a token may use more or
 * fewer than k latents. Kept entries are a coordinate list (row, latent, value) of length T = B*k.
 */
export function batchTopKCode(g: GraphBuilder, s: CodeInputs): Code {
  const { B, d, n, k } = s;
  const T = B * k;
  const flat = g.reshape(g.relu(s.pre), [B * n], "pre_flat"); // [B*n]
  const [vals, flatIdx] = g.opN("TopK", [flat, g.constI([T])], 2, { axis: 0, largest: 1, sorted: 0 }, "batch_topk"); // [T], [T]
  const nI = g.constI([n], []);
  const rows = g.op("Div", [flatIdx!, nI], {}, "kept_rows"); // [T] token of each kept entry
  const cols = g.op("Mod", [flatIdx!, nI], {}, "kept_cols"); // [T] latent of each kept entry
  const rows2 = g.reshape(rows, [T, 1]);
  const cols2 = g.reshape(cols, [T, 1]);
  const positive = g.greater(vals!, g.constF(0)); // [T]
  const active = g.cast(positive, F32, "active"); // [T]
  const wDecSel = g.gather(s.W_dec, cols, 0, "w_dec_sel"); // [T, d]
  const recon = g.scatterAdd(g.zeros([B, d]), rows2, g.mul(g.unsqueeze(vals!, [1]), wDecSel), "recon"); // [B, d]
  const fires = g.scatterAdd(g.zeros([n]), cols2, active, "fires"); // [n]
  const minAct = g.op("ReduceMin", [g.where(positive, vals!, g.constF(3.0e38))], { keepdims: 0 }, "min_act"); // []
  return {
    recon,
    fires,
    minAct,
    penalty: g.constF(0),
    backward(dRecon, xCent) {
      const dRows = g.gather(dRecon, rows, 0, "d_recon_rows"); // [T, d]
      const dActs = g.reduceSum(g.mul(wDecSel, dRows), [1], "d_acts"); // [T]
      const dVals = g.mul(dActs, active, "d_vals"); // [T] through the ReLU
      const decUpd = g.mul(g.unsqueeze(vals!, [1]), dRows); // [T, d]
      const encUpd = g.mul(g.unsqueeze(dVals, [1]), g.gather(xCent, rows, 0)); // [T, d]
      return {
        W_dec: g.scatterAdd(g.zeros([n, d]), cols2, decUpd, "g_W_dec"), // [n, d]
        W_enc: g.scatterAdd(g.zeros([n, d]), cols2, encUpd, "g_W_enc"), // [n, d]
        b_enc: g.scatterAdd(g.zeros([n]), cols2, dVals, "g_b_enc"), // [n]
      };
    },
  };
}

/**
 * ReLU + L1 (the classic baseline): every positive pre-activation is kept, so the code is dense and
 * so are its products. The penalty is l1 * sum_i f_i * |W_dec_i| per token (Anthropic's April 2024
 * update), which stops the SAE from shrinking activations by growing decoder rows.
 */
export function reluCode(g: GraphBuilder, s: CodeInputs, l1Coef: string): Code {
  const { B, n } = s;
  const acts = g.relu(s.pre, "acts"); // [B, n]
  const active = g.cast(g.greater(s.pre, g.constF(0)), F32, "active"); // [B, n]
  const recon = g.matmul(acts, s.W_dec, "recon"); // [B, d]
  const fires = g.reduceSum(active, [0], "fires"); // [n]
  const decNormKeep = g.reduceL2Keep(s.W_dec, 1, "dec_norm"); // [n, 1]
  const decNorm = g.reshape(decNormKeep, [n]); // [n]
  const actsSum = g.reduceSum(acts, [0], "acts_sum"); // [n]
  const coef = g.div(l1Coef, g.constF(B), "l1_per_token"); // [] the penalty is a mean over tokens
  const penalty = g.mul(g.reduceSum(g.mul(actsSum, decNorm), []), coef, "l1_penalty"); // []
  return {
    recon,
    fires,
    minAct: g.constF(0),
    penalty,
    backward(dRecon, xCent) {
      const dActs = g.add(g.gemm(dRecon, s.W_dec, { transB: true }), g.mul(decNorm, coef), "d_acts"); // [B, n]
      const dPre = g.mul(dActs, active, "d_pre"); // [B, n] through the ReLU
      const unitDec = g.div(s.W_dec, g.op("Max", [decNormKeep, g.constF(1e-12)])); // [n, d]
      const dDecNorm = g.mul(g.unsqueeze(g.mul(actsSum, coef), [1]), unitDec); // [n, d] penalty through |W_dec_i|
      return {
        W_dec: g.add(g.gemm(acts, dRecon, { transA: true }), dDecNorm, "g_W_dec"), // [n,B]@[B,d] -> [n, d]
        W_enc: g.gemm(dPre, xCent, { transA: true }, "g_W_enc"), // [n,B]@[B,d] -> [n, d]
        b_enc: g.reduceSum(dPre, [0], "g_b_enc"), // [n]
      };
    },
  };
}
