import { DataType, type ModelProto } from "../../services/producer/model/onnx.js";
import { attr, floatTensor, int64Tensor, valueInfo } from "./builder.js";
import { DecoderBlocks, type Tables } from "./decoder-blocks.js";
import type { DecoderLayerWeights, DecoderWeights, Linear } from "./decoder-weights.js";
import { type DecoderParams, FAMILIES, invFreq, rotaryDims, slides } from "./families.js";

/**
 * A family's CausalLM as the ONNX graph optimum exports (torch.onnx, no KV cache): inputs
 * input_ids / attention_mask / position_ids [batch, seq] int64, output logits [batch, seq, vocab],
 * node names from the module paths in families.ts (/transformer/h.L/..., /gpt_neox/layers.L/...,
 * /model/layers.L/...). The math follows transformers' modeling files, eager attention.
 */

/** Bumped when a graph, its weights or its tokenizer files change, so tiny-family.ts regenerates folders written by an older one. */
export const DECODER_GRAPH_VERSION = 1;

/** torch.finfo(float32).min: what transformers adds to masked attention scores. */
const MASKED = -3.4028234663852886e38;

/** GPT-2 keeps q|k|v as three row blocks of c_attn; GPT-NeoX interleaves them per head (q_h, k_h, v_h). */
function fuseQkv(p: DecoderParams, lw: DecoderLayerWeights, layout: "blocks" | "per_head"): Linear {
  const hd = p.headDim;
  const d = p.dModel;
  const parts = [lw.q, lw.k, lw.v];
  const heads = [...Array(p.heads).keys()];
  const order: Array<[Linear, number]> =
    layout === "blocks"
      ? parts.flatMap((w) => heads.map((h): [Linear, number] => [w, h]))
      : heads.flatMap((h) => parts.map((w): [Linear, number] => [w, h]));
  const weight = new Float32Array(3 * p.heads * hd * d);
  const bias = new Float32Array(3 * p.heads * hd);
  order.forEach(([w, h], i) => {
    weight.set(w.weight.subarray(h * hd * d, (h + 1) * hd * d), i * hd * d);
    bias.set(w.bias!.subarray(h * hd, (h + 1) * hd), i * hd);
  });
  return { weight, bias, out: 3 * p.heads * hd, in: d };
}

class DecoderGraph extends DecoderBlocks {
  constructor(
    p: DecoderParams,
    private readonly w: DecoderWeights,
  ) {
    super(p);
  }

  /** [batch, seq, n*hd] -> [batch, n, seq, hd] */
  private heads(scope: string, t: string, n: number): string {
    const { g } = this;
    return g.op(
      scope,
      "Transpose",
      [g.op(scope, "Reshape", [t, g.ints(scope, [0, 0, n, this.p.headDim])])],
      [attr.ints("perm", [0, 2, 1, 3])],
    );
  }

  private attention(layer: string, x: string, lw: DecoderLayerWeights, mask: string, tables: Tables | undefined): string {
    const { g, p, spec } = this;
    const paths = spec.paths;
    const a = `${layer}/${paths.attn}`;
    const s = this.scope(a);
    const hd = p.headDim;
    let q: string, k: string, v: string;
    if (spec.fusedQkv === "blocks") {
      const fused = this.linear(`${a}/${paths.qkv}`, x, fuseQkv(p, lw, "blocks"), { conv1d: true });
      const d = p.heads * hd;
      [q, k, v] = g.ops(s, "Split", [fused, g.ints(s, [d, d, d])], 3, [attr.int("axis", 2)]).map((t) => this.heads(s, t, p.heads)) as [
        string,
        string,
        string,
      ];
    } else if (spec.fusedQkv === "per_head") {
      const fused = g.op(s, "Reshape", [
        this.linear(`${a}/${paths.qkv}`, x, fuseQkv(p, lw, "per_head")),
        g.ints(s, [0, 0, p.heads, 3 * hd]),
      ]);
      const part = (i: number) =>
        g.op(
          s,
          "Transpose",
          [g.op(s, "Slice", [fused, g.ints(s, [i * hd]), g.ints(s, [(i + 1) * hd]), g.ints(s, [3])])],
          [attr.ints("perm", [0, 2, 1, 3])],
        );
      [q, k, v] = [part(0), part(1), part(2)];
    } else {
      q = this.heads(s, this.linear(`${a}/${paths.q}`, x, lw.q), p.heads);
      k = this.heads(s, this.linear(`${a}/${paths.k}`, x, lw.k), p.kvHeads);
      v = this.heads(s, this.linear(`${a}/${paths.v}`, x, lw.v), p.kvHeads);
    }
    if (tables) {
      const unsqueezed = {
        cos: g.op(s, "Unsqueeze", [tables.cos, g.ints(s, [1])]),
        sin: g.op(s, "Unsqueeze", [tables.sin, g.ints(s, [1])]),
      };
      q = this.rope(s, q, unsqueezed);
      k = this.rope(s, k, unsqueezed);
    }
    const merged = this.attend(s, q, this.repeatKv(s, k), this.repeatKv(s, v), mask);
    return this.linear(`${a}/${paths.o}`, merged, lw.o, { conv1d: spec.conv1d });
  }

  /** Gemma 2's sliding layers mask, in the layer's own scope as its decoder layer does, keys at or beyond the window. */
  private slidingMask(scope: string, mask: string, tooFar: string): string {
    const { g } = this;
    return g.op(scope, "Where", [g.op(scope, "Unsqueeze", [tooFar, g.ints(scope, [0, 1])]), g.scalar(scope, MASKED), mask]);
  }

  layer(l: number, h: string, masks: { mask: string; tooFar: string | undefined }, tables: Tables | undefined): string {
    const { g, spec } = this;
    const lw = this.w.layers[l]!;
    const paths = spec.paths;
    const layer = paths.layer.replace("{L}", String(l));
    const s = this.scope(layer);
    const mask = spec.sliding === "even" && slides(this.p, l) ? this.slidingMask(s, masks.mask, masks.tooFar!) : masks.mask;
    const n1 = this.norm(`${layer}/${paths.attnNorm}`, h, lw.attnNorm);
    let attnOut = this.attention(layer, n1.output, lw, mask, tables);
    if (lw.attnPostNorm) attnOut = this.norm(`${layer}/${paths.attnPostNorm!}`, attnOut, lw.attnPostNorm).output;
    if (spec.parallel) {
      // mlp_output + attn_output + hidden_states
      const mlpOut = this.mlp(layer, this.norm(`${layer}/${paths.mlpNorm}`, h, lw.mlpNorm).output, lw);
      return g.op(s, "Add", [g.op(s, "Add", [mlpOut, attnOut]), h]);
    }
    // GPT-2 and GPT-NeoX write attn_output + residual, the Llama family residual + hidden_states.
    const attnFirst = spec.name === "gpt2" || spec.name === "gpt_neox";
    const mid = g.op(s, "Add", attnFirst ? [attnOut, n1.input] : [n1.input, attnOut]);
    const n2 = this.norm(`${layer}/${paths.mlpNorm}`, mid, lw.mlpNorm);
    let mlpOut = this.mlp(layer, n2.output, lw);
    if (lw.mlpPostNorm) mlpOut = this.norm(`${layer}/${paths.mlpPostNorm!}`, mlpOut, lw.mlpPostNorm).output;
    return g.op(s, "Add", [n2.input, mlpOut]);
  }

  /**
   * The additive mask [batch, 1, seq, seq] (0 where a query may attend, MASKED for later keys and
   * padding), and the [seq, seq] "key at or beyond the window" matrix when a window is set. A
   * window on every layer (Mistral) is folded into the mask here, as its model does.
   */
  masks(root: string): { mask: string; tooFar: string | undefined } {
    const { g, p, spec } = this;
    const m = this.scope(root);
    const seq = g.op(m, "Gather", [g.op(m, "Shape", ["attention_mask"]), g.constant(m, int64Tensor([], [1]))], [attr.int("axis", 0)]);
    const positions = g.op(m, "Range", [g.constant(m, int64Tensor([], [0])), seq, g.constant(m, int64Tensor([], [1]))]);
    const query = g.op(m, "Unsqueeze", [positions, g.ints(m, [1])]);
    const key = g.op(m, "Unsqueeze", [positions, g.ints(m, [0])]);
    const later = g.op(m, "Greater", [key, query]);
    const tooFar =
      p.slidingWindow > 0 && spec.sliding !== "none"
        ? g.op(m, "Greater", [g.op(m, "Sub", [query, key]), g.constant(m, int64Tensor([], [p.slidingWindow - 1]))])
        : undefined;
    const blockedKeys = spec.sliding === "all" && tooFar ? g.op(m, "Or", [later, tooFar]) : later;
    const padding = g.op(m, "Equal", ["attention_mask", g.constant(m, int64Tensor([], [0]))]);
    const blocked = g.op(m, "Or", [
      g.op(m, "Unsqueeze", [blockedKeys, g.ints(m, [0, 1])]),
      g.op(m, "Unsqueeze", [padding, g.ints(m, [1, 2])]),
    ]);
    return { mask: g.op(m, "Where", [blocked, g.scalar(m, MASKED), g.scalar(m, 0)]), tooFar };
  }

  /** cos/sin [batch, seq, rotaryDims] from position_ids. */
  tables(positionIds: string): Tables | undefined {
    const { g, p, spec } = this;
    if (!spec.paths.rotary) return undefined;
    const r = this.scope(spec.paths.rotary);
    const angles = g.op(r, "Mul", [
      g.op(r, "Unsqueeze", [g.op(r, "Cast", [positionIds], [attr.int("to", DataType.FLOAT)]), g.ints(r, [2])]),
      g.constant(r, floatTensor([rotaryDims(p) / 2], invFreq(p))),
    ]);
    const emb = g.op(r, "Concat", [angles, angles], [attr.int("axis", -1)]);
    return { cos: g.op(r, "Cos", [emb]), sin: g.op(r, "Sin", [emb]) };
  }

  /** The residual stream entering layer 0, and the position ids the model reads. */
  embeddings(root: string): { h: string; positionIds: string } {
    const { g, p, spec, w } = this;
    const paths = spec.paths;
    const m = this.scope(root);
    let ids = "input_ids";
    let positionIds = "position_ids";
    if (paths.positions) {
      // GPT2Model views input_ids and position_ids as (-1, seq) before embedding them.
      const flat = (t: string) => {
        const last = g.op(m, "Unsqueeze", [
          g.op(m, "Gather", [g.op(m, "Shape", [t]), g.constant(m, int64Tensor([], [1]))]),
          g.ints(m, [0]),
        ]);
        return g.op(m, "Reshape", [t, g.op(m, "Concat", [g.ints(m, [-1]), last], [attr.int("axis", 0)])]);
      };
      ids = flat(ids);
      positionIds = flat(positionIds);
    }
    let h = g.op(this.scope(paths.embed), "Gather", [
      g.initializer(this.param(paths.embed, "weight"), [p.vocabSize, p.dModel], w.embed),
      ids,
    ]);
    if (paths.positions) {
      const table = g.initializer(this.param(paths.positions, "weight"), [p.maxPositions, p.dModel], w.positions!);
      h = g.op(m, "Add", [h, g.op(this.scope(paths.positions), "Gather", [table, positionIds])]);
    }
    if (spec.embedScale) h = g.op(m, "Mul", [h, g.scalar(m, Math.sqrt(p.dModel))]);
    return { h, positionIds };
  }

  /** Final norm, LM head (a transposed copy of the embedding when tied) and Gemma 2's final softcap. */
  head(h: string): void {
    const { g, p, spec, w } = this;
    const final = this.norm(spec.paths.finalNorm, h, w.finalNorm).output;
    const head: Linear = { weight: w.head, out: p.vocabSize, in: p.dModel };
    if (p.finalSoftcap <= 0) {
      this.linear(spec.paths.head, final, head, { output: "logits" });
      return;
    }
    const logits = this.linear(spec.paths.head, final, head);
    const cap = () => g.scalar("", p.finalSoftcap);
    g.op("", "Mul", [g.op("", "Tanh", [g.op("", "Div", [logits, cap()])]), cap()], [], "logits");
  }
}

export function buildDecoderModel(p: DecoderParams, w: DecoderWeights): ModelProto {
  const graph = new DecoderGraph(p, w);
  const spec = FAMILIES[p.family];
  const root = spec.paths.embed.split("/")[0]!;
  const { h: embedded, positionIds } = graph.embeddings(root);
  const masks = graph.masks(root);
  const tables = graph.tables(positionIds);
  let h = embedded;
  for (let l = 0; l < p.layers; l++) h = graph.layer(l, h, masks, tables);
  graph.head(h);

  const ids = (name: string) => valueInfo(name, DataType.INT64, ["batch_size", "sequence_length"]);
  return {
    irVersion: 8,
    producerName: "saeflow tools/model/tiny-family.ts",
    opsetImport: [{ domain: "", version: spec.opset }],
    graph: graph.g.graph(
      "main_graph",
      [ids("input_ids"), ids("attention_mask"), ids("position_ids")],
      [valueInfo("logits", DataType.FLOAT, ["batch_size", "sequence_length", p.vocabSize])],
    ),
  };
}
