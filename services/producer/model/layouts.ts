import type { GraphProto } from "./onnx.js";

/**
 * How the optimum (torch.onnx) export of each supported family lays out a decoder layer. torch.onnx
 * names every node `/<module path>/<Op>[_n]`, so a layer's nodes share the scope of its module
 * (`/model/layers.3/`, `/gpt_neox/layers.3/`, `/transformer/h.3/`) and a sublayer's nodes that of
 * its own module. The hook mapping reads two sublayer scopes per layer; the residual stream is then
 * found by structure (the Adds that read their outputs), not by node numbering.
 *
 * What each hook name denotes (TransformerLens's names; attn_out and mlp_out are what the sublayer
 * adds to the residual stream):
 *
 * | family                | attn_out                                   | mlp_out                                      |
 * | --------------------- | ------------------------------------------ | -------------------------------------------- |
 * | Llama, Qwen2, Mistral | output of self_attn.o_proj                 | output of mlp.down_proj                      |
 * | Gemma 2               | output of post_attention_layernorm (o_proj | output of post_feedforward_layernorm         |
 * |                       | output after its RMSNorm)                  | (down_proj output after its RMSNorm)         |
 * | GPT-2                 | output of attn.c_proj (bias included)      | output of mlp.c_proj (bias included)         |
 * | GPT-NeoX (Pythia)     | output of attention.dense (bias included)  | output of mlp.dense_4h_to_h (bias included)  |
 *
 * resid_pre is the stream entering the layer (for layer 0 the embedding: GPT-2's wte + wpe,
 * Gemma's embedding times sqrt(d)), resid_mid the stream after attention's residual Add, resid_post
 * the stream leaving the layer (the next layer's resid_pre). A GPT-NeoX layer with
 * use_parallel_residual (every Pythia) adds attention and MLP to the stream together, so it has no
 * resid_mid.
 */

export interface Layout {
  /** The families that export this layout, for messages. */
  families: string;
  /** Sublayer scopes inside a layer's scope whose single exiting tensor is attn_out / mlp_out. */
  attnOut: string;
  mlpOut: string;
  /** Scopes whose presence in a layer tells this layout from the others. */
  markers: readonly string[];
}

/** In detection order: Gemma 2 before Llama, whose layers hold a post_attention_layernorm too. */
export const LAYOUTS: readonly Layout[] = [
  {
    families: "Gemma 2",
    attnOut: "post_attention_layernorm/",
    mlpOut: "post_feedforward_layernorm/",
    markers: ["self_attn/o_proj/", "post_attention_layernorm/", "post_feedforward_layernorm/"],
  },
  {
    families: "Llama, Qwen2, Mistral",
    attnOut: "self_attn/o_proj/",
    mlpOut: "mlp/down_proj/",
    markers: ["self_attn/o_proj/", "mlp/down_proj/"],
  },
  { families: "GPT-2", attnOut: "attn/c_proj/", mlpOut: "mlp/c_proj/", markers: ["attn/c_proj/", "mlp/c_proj/"] },
  {
    families: "GPT-NeoX (Pythia)",
    attnOut: "attention/dense/",
    mlpOut: "mlp/dense_4h_to_h/",
    markers: ["attention/dense/", "mlp/dense_4h_to_h/"],
  },
];

/** A layer scope: Llama/Gemma/Qwen2/Mistral ".../layers.L/", GPT-NeoX "/gpt_neox/layers.L/", GPT-2 "/transformer/h.L/". */
const LAYER = /^(.*?\/(?:layers|h)\.)(\d+)\//;

const LOOKED_FOR =
  `node names with a layer scope "/model/layers.<L>/" (Llama, Gemma 2, Qwen2, Mistral), "/gpt_neox/layers.<L>/" (GPT-NeoX) ` +
  `or "/transformer/h.<L>/" (GPT-2), as torch.onnx names the nodes of an optimum export; other exporters' names ` +
  `(torch.onnx's dynamo exporter, graphs fused by optimum's --optimize) are not read`;

/** The name scope of each decoder layer, e.g. "/model/layers.0/", from node names. */
export function layerScopes(graph: GraphProto): string[] {
  // Grouped by prefix, in case some other module is numbered too; the decoder stack has the most.
  const byPrefix = new Map<string, Map<number, string>>();
  for (const node of graph.node ?? []) {
    const m = LAYER.exec(node.name ?? "");
    if (!m) continue;
    const scopes = byPrefix.get(m[1]!) ?? new Map<number, string>();
    scopes.set(Number(m[2]), `${m[1]}${m[2]}/`);
    byPrefix.set(m[1]!, scopes);
  }
  const [prefix, scopes] = [...byPrefix.entries()].sort((a, b) => b[1].size - a[1].size)[0] ?? [];
  if (!prefix || !scopes) throw new Error(`the graph has no decoder layers saeflow can read: looked for ${LOOKED_FOR}`);
  const layers = scopes.size;
  for (let l = 0; l < layers; l++) {
    if (!scopes.has(l)) throw new Error(`the graph's layer scopes are not numbered 0..${layers - 1}: no node is named "${prefix}${l}/*"`);
  }
  return [...Array(layers).keys()].map((l) => scopes.get(l)!);
}

/** The layout of the layer at `scope` (layer 0's tells the model's). */
export function detectLayout(graph: GraphProto, scope: string): Layout {
  const inside = (graph.node ?? []).map((n) => n.name ?? "").filter((name) => name.startsWith(scope));
  const has = (sub: string) => inside.some((name) => name.startsWith(scope + sub));
  const layout = LAYOUTS.find((l) => l.markers.every(has));
  if (layout) return layout;
  // A node's module path is its name less the op; the layer's own ops (its Adds) have none.
  const modules = [...new Set(inside.map((name) => name.slice(scope.length).replace(/\/?[^/]*$/, "")).filter(Boolean))];
  const wanted = LAYOUTS.map((l) => `${l.markers.join(" + ")} (${l.families})`).join("; ");
  throw new Error(
    `layer 0 (nodes named "${scope}*") has none of the sublayer layouts saeflow reads: looked for ${wanted}; ` +
      `its modules are ${modules.slice(0, 16).join(", ") || "none"}`,
  );
}
