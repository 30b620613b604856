import { F32, type GraphBuilder, I64 } from "./builder.js";

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
  /**
   * [n] decoder-row norms when latents are ranked by activation x norm (Llama Scope's TopK, for
   * decoders whose norms are not fixed at one); "" ranks by activation.
   */
  rankNorm: string;
  /**
   * Nested prefix sizes (matryoshka), increasing and below n; the whole dictionary is the last
   * prefix. Empty for one reconstruction. With G = prefixes + 1 groups, `recon` is [G, B, d]: what
   * each group of latents [prefix_{g-1}, prefix_g) adds.
   */
  prefixes: readonly number[];
  /** Index arithmetic in int32, so that it stays on a GPU provider (see keptEntries). */
  int32Index: boolean;
}

export interface CodeGrads {
  W_enc: string; // [n, d]
  W_dec: string; // [n, d]
  b_enc: string; // [n]
  /** gated's magnitude path. */
  r_mag?: string; // [n]
  b_mag?: string; // [n]
  /** jumprelu_trained's threshold parameter. */
  threshold?: string; // [n]
  /**
   * [n] sum over tokens of dL/d(x_cent . W_enc_i), which carries b_dec's encoder-side gradient;
   * equal to b_enc's gradient, and so absent, for every code but gated.
   */
  encoderSum?: string;
}

export interface Code {
  /** [B, d] sum over active latents of act * W_dec row (no bias); [G, B, d] per group with prefixes. */
  recon: string;
  /** [n] tokens each latent fired on in this batch. */
  fires: string;
  /** [] smallest positive score kept (BatchTopK's inference threshold); 0 where unused. */
  minAct: string;
  /** [] sparsity penalty added to the loss; 0 where the recipe has none. */
  penalty: string;
  /** [] auxiliary loss of the code itself (gated's reconstruction through the gate); 0 where none. */
  aux: string;
  /** Gradients given dL/d recon (recon's shape) and x_cent [B, d]. */
  backward(dRecon: string, xCent: string): CodeGrads;
}

/** Latent boundaries of the nested groups: [0, prefixes..., n]. */
export const groupBounds = (prefixes: readonly number[], n: number): number[] => [0, ...prefixes, n];

/**
 * ScatterND's row indices [..., 1] for latent ids `idx` (int64, any shape) below n. The int64 ids are
 * looked up in an int32 column of 0..n-1 and cast back, because onnxruntime's WebGPU provider has
 * no int64 Reshape or Unsqueeze: reshaping them directly sends them to the CPU and back every step.
 */
function scatterRows(g: GraphBuilder, idx: string, n: number, hint: string): string {
  const ids = g.constI32(
    Array.from({ length: n }, (_, i) => i),
    [n, 1],
    "latent_ids",
  ); // [n, 1]
  return g.cast(g.gather(ids, idx, 0), I64, hint); // [..., 1]
}

/**
 * TopK: each token keeps its k largest pre-activations (ReLU'd). The decoder is a Gather of the k
 * active rows and every weight gradient is a ScatterND-add of B*k rows, so the encoder GEMM stays
 * the only dense product.
 */
export function topKCode(g: GraphBuilder, s: CodeInputs): Code {
  const { B, d, n, k } = s;
  const score = s.rankNorm ? g.mul(g.relu(s.pre), s.rankNorm, "score") : s.pre; // [B, n]
  // Unsorted: the kept set is the same, and nothing downstream needs it in order (one less sort per row).
  const [top, idx] = g.opN("TopK", [score, g.constI([k])], 2, { axis: 1, largest: 1, sorted: 0 }, "topk"); // [B, k], [B, k]
  const vals = s.rankNorm ? g.op("GatherElements", [s.pre, idx!], { axis: 1 }, "topk_pre") : top!; // [B, k]
  const acts = g.relu(vals, "acts"); // [B, k]
  const active = g.cast(g.greater(vals, g.constF(0)), F32, "active"); // [B, k] 1 where the latent fires
  const rows = scatterRows(g, idx!, n, "active_rows"); // [B, k, 1]
  const wDecSel = g.gather(s.W_dec, idx!, 0, "w_dec_sel"); // [B, k, d]
  const recon = g.reshape(g.matmul(g.unsqueeze(acts, [1]), wDecSel), [B, d], "recon"); // [B,1,k]@[B,k,d] -> [B, d]
  const fires = g.serially(() => g.scatterAdd(g.zeros([n]), rows, active, "fires")); // [n]
  return {
    recon,
    fires,
    minAct: g.constF(0),
    penalty: g.constF(0),
    aux: g.constF(0),
    backward(dRecon, xCent) {
      const dActs = g.reshape(g.matmul(wDecSel, g.unsqueeze(dRecon, [2])), [B, k], "d_acts"); // [B,k,d]@[B,d,1] -> [B, k]
      const dVals = g.mul(dActs, active, "d_vals"); // [B, k] through the ReLU
      return g.serially(() => {
        const decUpd = g.mul(g.unsqueeze(acts, [2]), g.unsqueeze(dRecon, [1])); // [B, k, d]
        const encUpd = g.mul(g.unsqueeze(dVals, [2]), g.unsqueeze(xCent, [1])); // [B, k, d]
        return {
          W_dec: g.scatterAdd(g.zeros([n, d]), rows, decUpd, "g_W_dec"), // [n, d]
          W_enc: g.scatterAdd(g.zeros([n, d]), rows, encUpd, "g_W_enc"), // [n, d]
          b_enc: g.scatterAdd(g.zeros([n]), rows, dVals, "g_b_enc"), // [n]
        };
      });
    },
  };
}

/**
 * BatchTopK: the batch keeps its B*k largest ReLU'd pre-activations, so a token may use more or
 * fewer than k latents. Kept entries are a coordinate list (row, latent, value) of length T = B*k.
 * With prefixes (Matryoshka-BatchTopK) each entry lands in its group's slice of a [G*B, d]
 * reconstruction, so one ScatterND still makes every nested reconstruction.
 */
export function batchTopKCode(g: GraphBuilder, s: CodeInputs): Code {
  const { B, d, n, k } = s;
  const T = B * k;
  const G = s.prefixes.length + 1;
  const relu = g.relu(s.pre, "relu_pre"); // [B, n]
  const flat = g.reshape(relu, [B * n], "pre_flat"); // [B*n]
  const scoreFlat = s.rankNorm ? g.reshape(g.mul(relu, s.rankNorm), [B * n], "score_flat") : flat; // [B*n]
  const [top, flatIdx] = g.opN("TopK", [scoreFlat, g.constI([T])], 2, { axis: 0, largest: 1, sorted: 0 }, "batch_topk"); // [T], [T]
  const vals = s.rankNorm ? g.gather(flat, flatIdx!, 0, "kept_vals") : top!; // [T]
  const { rows, cols, cols2, slot, slot2 } = keptEntries(g, flatIdx!, s);
  const positive = g.greater(top!, g.constF(0)); // [T]
  const active = g.cast(positive, F32, "active"); // [T]
  // A token holds several kept entries, so the reconstruction is a scatter-add over repeated rows.
  const { recon, fires } = g.serially(() => {
    const contrib = g.mul(g.unsqueeze(vals, [1]), g.gather(s.W_dec, cols, 0)); // [T, d]
    return {
      recon:
        G > 1
          ? g.reshape(g.scatterAdd(g.zeros([G * B, d]), slot2, contrib), [G, B, d], "recon") // [G, B, d]
          : g.scatterAdd(g.zeros([B, d]), slot2, contrib, "recon"), // [B, d]
      fires: g.scatterAdd(g.zeros([n]), cols2, active, "fires"), // [n]
    };
  });
  // The same rows as the reconstruction's, gathered again where the backward pass reads them: on the
  // CPU they would otherwise cross between stages, and one graph makes them once (common subexpressions).
  const wDecSel = g.late(() => g.gather(s.W_dec, cols, 0, "w_dec_sel")); // [T, d]
  const minAct = g.op("ReduceMin", [g.where(positive, top!, g.constF(3.0e38))], { keepdims: 0 }, "min_act"); // [] in score units
  return {
    recon,
    fires,
    minAct,
    penalty: g.constF(0),
    aux: g.constF(0),
    backward(dRecon, xCent) {
      const dRows = g.gather(G > 1 ? g.reshape(dRecon, [G * B, d]) : dRecon, slot, 0, "d_recon_rows"); // [T, d]
      const dActs = g.reduceSum(g.mul(wDecSel, dRows), [1], "d_acts"); // [T]
      const dVals = g.mul(dActs, active, "d_vals"); // [T] through the ReLU
      // dRows again rather than handed over: on the CPU the update is made where it is scattered (see serially()).
      return g.serially(() => {
        const decUpd = g.mul(g.unsqueeze(vals, [1]), g.gather(G > 1 ? g.reshape(dRecon, [G * B, d]) : dRecon, slot, 0)); // [T, d]
        const encUpd = g.mul(g.unsqueeze(dVals, [1]), g.gather(xCent, rows, 0)); // [T, d]
        return {
          W_dec: g.scatterAdd(g.zeros([n, d]), cols2, decUpd, "g_W_dec"), // [n, d]
          W_enc: g.scatterAdd(g.zeros([n, d]), cols2, encUpd, "g_W_enc"), // [n, d]
          b_enc: g.scatterAdd(g.zeros([n]), cols2, dVals, "g_b_enc"), // [n]
        };
      });
    },
  };
}

/** Where BatchTopK's kept entries sit: token, latent, and row of the (nested) reconstruction. */
interface KeptEntries {
  /** [T] token of each kept entry. */
  rows: string;
  /** [T] latent of each kept entry. */
  cols: string;
  /** [T, 1] int64 latents, ScatterND's indices. */
  cols2: string;
  /** [T] row of the [G*B, d] reconstruction each entry adds to: its group's block, then its token. */
  slot: string;
  /** [T, 1] int64 slots. */
  slot2: string;
}

/**
 * Splits the kept entries' flat ids into token and latent. In int64 (Div, Mod) on the CPU; with
 * `int32Index`, in int32 from a 0..B*n-1 table onnxruntime folds into a constant, since its WebGPU
 * provider has no int64 arithmetic and would copy the T ids to the CPU and back every step.
 */
function keptEntries(g: GraphBuilder, flatIdx: string, s: CodeInputs): KeptEntries {
  const { B, n, k } = s;
  const T = B * k;
  const G = s.prefixes.length + 1;
  const groupOf = Array.from({ length: n }, (_, i) => s.prefixes.filter((p) => p <= i).length);
  const wide = (a: string) => g.cast(g.reshape(a, [T, 1]), I64); // [T, 1]
  if (s.int32Index) {
    const ids = g.op("Range", [g.constI32([0], []), g.constI32([B * n], []), g.constI32([1], [])], {}, "flat_ids"); // [B*n]
    const flat = g.gather(ids, flatIdx, 0, "kept_flat"); // [T] int32
    const nI = g.constI32([n], []);
    const rows = g.op("Div", [flat, nI], {}, "kept_rows"); // [T]
    const cols = g.sub(flat, g.mul(rows, nI), "kept_cols"); // [T]
    const slot = G > 1 ? g.add(rows, g.mul(g.gather(g.constI32(groupOf, [n]), cols, 0), g.constI32([B], [])), "kept_slot") : rows; // [T]
    const cols2 = wide(cols);
    return { rows, cols, cols2, slot, slot2: G > 1 ? wide(slot) : wide(rows) };
  }
  const nI = g.constI([n], []);
  const rows = g.op("Div", [flatIdx, nI], {}, "kept_rows"); // [T]
  const cols = g.op("Mod", [flatIdx, nI], {}, "kept_cols"); // [T]
  const slot = G > 1 ? g.add(rows, g.mul(g.gather(g.constI(groupOf, [n]), cols, 0), g.constI([B], [])), "kept_slot") : rows; // [T]
  return { rows, cols, cols2: g.reshape(cols, [T, 1]), slot, slot2: g.reshape(slot, [T, 1]) };
}

/**
 * TopK (per token) or BatchTopK (per batch, with optional nested prefixes) with k fed every step,
 * for Llama Scope's k annealing. Early k can be in the thousands, where the sparse codes' [B, k, d]
 * gathers would dwarf the dense products, so the kept latents become a [B, n] mask and the
 * products are dense, as ReLU's are. `kIn` is the [1] int64 k of this step.
 */
export function maskedCode(g: GraphBuilder, s: CodeInputs, opts: { batch: boolean; kIn: string }): Code {
  const { B, n } = s;
  const relu = g.relu(s.pre, "relu_pre"); // [B, n]
  const score = s.rankNorm ? g.mul(relu, s.rankNorm, "score") : relu; // [B, n]
  let mask: string;
  if (opts.batch) {
    const T = g.mul(opts.kIn, g.constI([B]), "kept_count"); // [1] B*k
    const [, idx] = g.opN("TopK", [g.reshape(score, [B * n]), T], 2, { axis: 0, largest: 1, sorted: 0 }, "batch_topk"); // [T]
    const ones = g.op("Expand", [g.constF(1), g.op("Shape", [idx!])]); // [T]
    mask = g.reshape(g.op("ScatterElements", [g.zeros([B * n]), idx!, ones], { axis: 0 }), [B, n], "mask"); // [B, n]
  } else {
    const [, idx] = g.opN("TopK", [score, opts.kIn], 2, { axis: 1, largest: 1, sorted: 0 }, "topk"); // [B, k]
    const ones = g.op("Expand", [g.constF(1), g.op("Shape", [idx!])]); // [B, k]
    mask = g.op("ScatterElements", [g.zeros([B, n]), idx!, ones], { axis: 1 }, "mask"); // [B, n]
  }
  const active = g.mul(mask, g.cast(g.greater(s.pre, g.constF(0)), F32), "active"); // [B, n] kept and positive
  const acts = g.mul(relu, mask, "acts"); // [B, n]
  const bounds = groupBounds(s.prefixes, n);
  const groups = bounds.slice(1).map((end, i) => ({ start: bounds[i]!, end }));
  const actsOf = groups.map(({ start, end }) => (groups.length > 1 ? g.slice(acts, 1, start, end) : acts)); // [B, size_g]
  const decOf = groups.map(({ start, end }) => (groups.length > 1 ? g.slice(s.W_dec, 0, start, end) : s.W_dec)); // [size_g, d]
  const recon =
    groups.length > 1
      ? g.op(
          "Concat",
          groups.map((_, i) => g.unsqueeze(g.matmul(actsOf[i]!, decOf[i]!), [0])),
          { axis: 0 },
          "recon",
        ) // [G, B, d]
      : g.matmul(acts, s.W_dec, "recon"); // [B,n]@[n,d] -> [B, d]
  const minAct = opts.batch
    ? g.op("ReduceMin", [g.where(g.greater(active, g.constF(0)), score, g.constF(3.0e38))], { keepdims: 0 }, "min_act") // [] in score units
    : g.constF(0);
  return {
    recon,
    fires: g.reduceSum(active, [0], "fires"), // [n]
    minAct,
    penalty: g.constF(0),
    aux: g.constF(0),
    backward(dRecon, xCent) {
      const dReconOf = groups.map((_, i) => (groups.length > 1 ? g.pick(dRecon, 0, i) : dRecon)); // [B, d] per group
      const dActsOf = groups.map((_, i) => g.gemm(dReconOf[i]!, decOf[i]!, { transB: true })); // [B,d]@[d,size_g] -> [B, size_g]
      const gDecOf = groups.map((_, i) => g.gemm(actsOf[i]!, dReconOf[i]!, { transA: true })); // [size_g,B]@[B,d] -> [size_g, d]
      const dActs = groups.length > 1 ? g.op("Concat", dActsOf, { axis: 1 }) : dActsOf[0]!; // [B, n]
      const dPre = g.mul(dActs, active, "d_pre"); // [B, n] through the mask and the ReLU
      return {
        W_dec: groups.length > 1 ? g.op("Concat", gDecOf, { axis: 0 }, "g_W_dec") : gDecOf[0]!, // [n, d]
        W_enc: g.gemm(dPre, xCent, { transA: true }, "g_W_enc"), // [n,B]@[B,d] -> [n, d]
        b_enc: g.reduceSum(dPre, [0], "g_b_enc"), // [n]
      };
    },
  };
}

/**
 * ReLU + L1 (the classic baseline): every positive pre-activation is kept, so the code is dense and
 * so are its products. The penalty is l1 * sum_i f_i * |W_dec_i| per token (Anthropic's April 2024
 * update), which stops the SAE from shrinking activations by growing decoder rows.
 */
export function reluCode(g: GraphBuilder, s: CodeInputs, l1Coef: string, decNormKeep: string): Code {
  const { B, n } = s;
  const acts = g.relu(s.pre, "acts"); // [B, n]
  const active = g.cast(g.greater(s.pre, g.constF(0)), F32, "active"); // [B, n]
  const recon = g.matmul(acts, s.W_dec, "recon"); // [B, d]
  const fires = g.reduceSum(active, [0], "fires"); // [n]
  const decNorm = g.reshape(decNormKeep, [n]); // [n]
  const actsSum = g.reduceSum(acts, [0], "acts_sum"); // [n]
  const coef = g.div(l1Coef, g.constF(B), "l1_per_token"); // [] the penalty is a mean over tokens
  const penalty = g.mul(g.reduceSum(g.mul(actsSum, decNorm), []), coef, "l1_penalty"); // []
  return {
    recon,
    fires,
    minAct: g.constF(0),
    penalty,
    aux: g.constF(0),
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
