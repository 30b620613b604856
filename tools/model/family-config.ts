import { type DecoderParams, FAMILIES, type FamilyName } from "./families.js";

/**
 * config.json as transformers writes it for each family (field names as in the Hub configs of
 * gpt2, EleutherAI/pythia-*, google/gemma-2-*, Qwen/Qwen2-*, mistralai/Mistral-7B-v0.1), with
 * this model's sizes.
 */
type Fields = (p: DecoderParams, id: (token: string | undefined) => number | null) => Record<string, unknown>;

/** The fields Llama's descendants share (Gemma 2, Qwen2, Mistral). */
const llamaLike = (p: DecoderParams) => ({
  hidden_size: p.dModel,
  intermediate_size: p.ffn,
  num_attention_heads: p.heads,
  num_hidden_layers: p.layers,
  num_key_value_heads: p.kvHeads,
  head_dim: p.headDim,
  rms_norm_eps: p.eps,
  rope_theta: p.ropeTheta,
  max_position_embeddings: 32768,
  attention_dropout: 0.0,
});

const FIELDS: Record<FamilyName, Fields> = {
  gpt2: (p) => ({
    activation_function: "gelu_new",
    attn_pdrop: 0.1,
    embd_pdrop: 0.1,
    resid_pdrop: 0.1,
    layer_norm_epsilon: p.eps,
    n_ctx: p.maxPositions,
    n_embd: p.dModel,
    n_head: p.heads,
    n_inner: p.ffn,
    n_layer: p.layers,
    n_positions: p.maxPositions,
    reorder_and_upcast_attn: false,
    scale_attn_by_inverse_layer_idx: false,
    scale_attn_weights: true,
  }),
  gpt_neox: (p) => ({
    attention_bias: true,
    hidden_act: "gelu",
    hidden_size: p.dModel,
    intermediate_size: p.ffn,
    layer_norm_eps: p.eps,
    max_position_embeddings: 2048,
    num_attention_heads: p.heads,
    num_hidden_layers: p.layers,
    rotary_emb_base: p.ropeTheta,
    rotary_pct: p.rotaryPct,
    use_parallel_residual: FAMILIES.gpt_neox.parallel,
  }),
  gemma2: (p, id) => ({
    ...llamaLike(p),
    attention_bias: false,
    attn_logit_softcapping: p.attnSoftcap || null,
    cache_implementation: "hybrid",
    final_logit_softcapping: p.finalSoftcap || null,
    hidden_act: "gelu_pytorch_tanh",
    hidden_activation: "gelu_pytorch_tanh",
    pad_token_id: id(FAMILIES.gemma2.tokenizer.pad),
    query_pre_attn_scalar: p.queryPreAttnScalar,
    sliding_window: p.slidingWindow || null,
  }),
  // Qwen2 checkpoints ship a window but leave it off; saeflow's tiny Qwen2 does the same.
  qwen2: (p) => ({ ...llamaLike(p), hidden_act: "silu", max_window_layers: p.layers, sliding_window: 32768, use_sliding_window: false }),
  mistral: (p) => ({ ...llamaLike(p), hidden_act: "silu", sliding_window: p.slidingWindow || null }),
};

export function familyConfig(p: DecoderParams, ids: Record<string, number>): Record<string, unknown> {
  const spec = FAMILIES[p.family];
  const id = (token: string | undefined) => (token === undefined ? null : (ids[token] ?? null));
  return {
    architectures: [spec.architecture],
    model_type: p.family,
    bos_token_id: id(spec.tokenizer.bos),
    eos_token_id: id(spec.tokenizer.eos),
    initializer_range: 0.02,
    tie_word_embeddings: spec.tiedEmbeddings,
    torch_dtype: "float32",
    use_cache: false,
    vocab_size: p.vocabSize,
    ...FIELDS[p.family](p, id),
  };
}
