import { DataType, type ModelProto } from "../../services/producer/model/onnx.js";
import { attr, floatTensor, GraphBuilder, int64Tensor, valueInfo } from "./builder.js";
import { headDim, type LlamaParams, type LlamaWeights, ropeInvFreq } from "./llama.js";

/**
 * LlamaForCausalLM as the ONNX graph that optimum's export (torch.onnx, no KV cache) produces:
 * inputs input_ids / attention_mask / position_ids [batch, seq] int64, output logits
 * [batch, seq, vocab]; torch's node names (/model/layers.L/self_attn/q_proj/MatMul,
 * /model/layers.L/Add, /model/layers.L/Add_1, /model/norm/..., /lm_head/MatMul); Linear weights
 * stored transposed for MatMul. The math follows transformers' modeling_llama (eager attention).
 */

/** Bumped when the graph or its weights change, so tiny-llama.ts regenerates folders written by an older one. */
export const GRAPH_VERSION = 3;

/** torch.finfo(float32).min: what transformers adds to masked attention scores. */
const MASKED = -3.4028234663852886e38;

/** [out, in] row-major to [in, out], the layout MatMul(x, W) needs. */
function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = w[r * cols + c]!;
  return t;
}

export function buildLlamaModel(p: LlamaParams, w: LlamaWeights): ModelProto {
  const g = new GraphBuilder();
  const d = p.dModel;
  const hd = headDim(p);
  let matmuls = 0;
  // torch.onnx stores a Linear's transposed weight as an anonymous initializer "onnx::MatMul_<n>".
  const linear = (scope: string, x: string, weight: Float32Array, outDim: number, inDim: number, output?: string) =>
    g.op(scope, "MatMul", [x, g.initializer(`onnx::MatMul_${++matmuls}`, [inDim, outDim], transpose(weight, outDim, inDim))], [], output);

  // LlamaRMSNorm computes in float32 and casts back: in a float32 export both Casts are no-ops,
  // and torch.onnx then wires the residual Add to the first Cast's output, so `input` is returned
  // for the residual stream to read as a real export does.
  const rmsNorm = (scope: string, x: string, weightName: string, weight: Float32Array) => {
    const input = g.op(scope, "Cast", [x], [attr.int("to", DataType.FLOAT)]);
    const variance = g.op(
      scope,
      "ReduceMean",
      [g.op(scope, "Pow", [input, g.scalar(scope, 2)])],
      [attr.ints("axes", [-1]), attr.int("keepdims", 1)],
    );
    const rsqrt = g.op(scope, "Div", [
      g.scalar(scope, 1),
      g.op(scope, "Sqrt", [g.op(scope, "Add", [variance, g.scalar(scope, p.rmsEps)])]),
    ]);
    const normed = g.op(scope, "Cast", [g.op(scope, "Mul", [input, rsqrt])], [attr.int("to", DataType.FLOAT)]);
    return { input, output: g.op(scope, "Mul", [g.initializer(weightName, [d], weight), normed]) };
  };

  // Additive mask [batch, 1, seq, seq]: 0 where a query may attend, MASKED for later keys and padding.
  const m = "/model";
  const seq = g.op(m, "Gather", [g.op(m, "Shape", ["attention_mask"]), g.constant(m, int64Tensor([], [1]))], [attr.int("axis", 0)]);
  const positions = g.op(m, "Range", [g.constant(m, int64Tensor([], [0])), seq, g.constant(m, int64Tensor([], [1]))]);
  const later = g.op(m, "Greater", [g.op(m, "Unsqueeze", [positions, g.ints(m, [0])]), g.op(m, "Unsqueeze", [positions, g.ints(m, [1])])]);
  const padding = g.op(m, "Equal", ["attention_mask", g.constant(m, int64Tensor([], [0]))]);
  const blocked = g.op(m, "Or", [g.op(m, "Unsqueeze", [later, g.ints(m, [0, 1])]), g.op(m, "Unsqueeze", [padding, g.ints(m, [1, 2])])]);
  const mask = g.op(m, "Where", [blocked, g.scalar(m, MASKED), g.scalar(m, 0)]);

  // Rotary tables [batch, seq, head_dim] from position_ids, shared by all layers.
  const r = "/model/rotary_emb";
  const angles = g.op(r, "Mul", [
    g.op(r, "Unsqueeze", [g.op(r, "Cast", ["position_ids"], [attr.int("to", DataType.FLOAT)]), g.ints(r, [2])]),
    g.constant(r, floatTensor([hd / 2], ropeInvFreq(p))),
  ]);
  const emb = g.op(r, "Concat", [angles, angles], [attr.int("axis", -1)]);
  const cos = g.op(r, "Cos", [emb]);
  const sin = g.op(r, "Sin", [emb]);

  let residual = g.op("/model/embed_tokens", "Gather", [
    g.initializer("model.embed_tokens.weight", [p.vocabSize, d], w.embed),
    "input_ids",
  ]);

  w.layers.forEach((lw, l) => {
    const scope = `/model/layers.${l}`;
    const a = `${scope}/self_attn`;
    const norm1 = rmsNorm(`${scope}/input_layernorm`, residual, `model.layers.${l}.input_layernorm.weight`, lw.inputNorm);
    const x = norm1.output;
    // [batch, seq, heads*hd] -> [batch, heads, seq, hd]
    const split = (t: string, heads: number) =>
      g.op(a, "Transpose", [g.op(a, "Reshape", [t, g.ints(a, [0, 0, heads, hd])])], [attr.ints("perm", [0, 2, 1, 3])]);
    const cos4 = g.op(a, "Unsqueeze", [cos, g.ints(a, [1])]);
    const sin4 = g.op(a, "Unsqueeze", [sin, g.ints(a, [1])]);
    // q * cos + rotate_half(q) * sin, rotate_half(q) = cat(-q[..., hd/2:], q[..., :hd/2])
    const rope = (t: string) => {
      const half = (from: number, to: number) => g.op(a, "Slice", [t, g.ints(a, [from]), g.ints(a, [to]), g.ints(a, [3])]);
      const first = half(0, hd / 2);
      const rotated = g.op(a, "Concat", [g.op(a, "Neg", [half(hd / 2, hd)]), first], [attr.int("axis", -1)]);
      return g.op(a, "Add", [g.op(a, "Mul", [t, cos4]), g.op(a, "Mul", [rotated, sin4])]);
    };
    // repeat_kv: [batch, kv, seq, hd] -> [batch, heads, seq, hd], each kv head serving heads/kv query heads.
    const repeat = (t: string) => {
      const groups = p.heads / p.kvHeads;
      if (groups === 1) return t;
      const expanded = g.op(a, "Expand", [g.op(a, "Unsqueeze", [t, g.ints(a, [2])]), g.ints(a, [1, 1, groups, 1, 1])]);
      return g.op(a, "Reshape", [expanded, g.ints(a, [0, p.heads, -1, hd])]);
    };
    const q = rope(split(linear(`${a}/q_proj`, x, lw.q, p.heads * hd, d), p.heads));
    const k = repeat(rope(split(linear(`${a}/k_proj`, x, lw.k, p.kvHeads * hd, d), p.kvHeads)));
    const v = repeat(split(linear(`${a}/v_proj`, x, lw.v, p.kvHeads * hd, d), p.kvHeads));
    const scores = g.op(a, "Mul", [
      g.op(a, "MatMul", [q, g.op(a, "Transpose", [k], [attr.ints("perm", [0, 1, 3, 2])])]),
      g.scalar(a, 1 / Math.sqrt(hd)),
    ]);
    const probs = g.op(a, "Softmax", [g.op(a, "Add", [scores, mask])], [attr.int("axis", -1)]);
    const merged = g.op(a, "Reshape", [
      g.op(a, "Transpose", [g.op(a, "MatMul", [probs, v])], [attr.ints("perm", [0, 2, 1, 3])]),
      g.ints(a, [0, 0, p.heads * hd]),
    ]);
    const attnOut = linear(`${a}/o_proj`, merged, lw.o, d, p.heads * hd);
    const mid = g.op(scope, "Add", [norm1.input, attnOut]);

    const mlp = `${scope}/mlp`;
    const norm2 = rmsNorm(`${scope}/post_attention_layernorm`, mid, `model.layers.${l}.post_attention_layernorm.weight`, lw.postNorm);
    const y = norm2.output;
    const gate = linear(`${mlp}/gate_proj`, y, lw.gate, p.ffn, d);
    const act = g.op(`${mlp}/act_fn`, "Mul", [gate, g.op(`${mlp}/act_fn`, "Sigmoid", [gate])]);
    const hidden = g.op(mlp, "Mul", [act, linear(`${mlp}/up_proj`, y, lw.up, p.ffn, d)]);
    residual = g.op(scope, "Add", [norm2.input, linear(`${mlp}/down_proj`, hidden, lw.down, d, p.ffn)]);
  });

  const final = rmsNorm("/model/norm", residual, "model.norm.weight", w.norm).output;
  linear("/lm_head", final, w.lmHead, p.vocabSize, d, "logits");

  const ids = (name: string) => valueInfo(name, DataType.INT64, ["batch_size", "sequence_length"]);
  return {
    irVersion: 8,
    producerName: "saeflow tools/model/tiny-llama.ts",
    opsetImport: [{ domain: "", version: 14 }],
    graph: g.graph(
      "main_graph",
      [ids("input_ids"), ids("attention_mask"), ids("position_ids")],
      [valueInfo("logits", DataType.FLOAT, ["batch_size", "sequence_length", p.vocabSize])],
    ),
  };
}
