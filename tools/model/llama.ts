import { normalSampler } from "./prng.js";

/**
 * Llama architecture parameters and weights in Hugging Face's layout (Linear weights [out, in],
 * row-major), shared by the ONNX graph builder and the TypeScript reference forward.
 */

export interface LlamaParams {
  seed: number;
  layers: number;
  dModel: number;
  heads: number;
  kvHeads: number;
  ffn: number;
  vocabSize: number;
  ropeTheta: number;
  rmsEps: number;
}

/** Llama-3.1-8B's shape language at toy width: GQA 2:1, SwiGLU, rope_theta 5e5, the full vocabulary. */
export const TINY_LLAMA: LlamaParams = {
  seed: 0,
  layers: 2,
  dModel: 64,
  heads: 4,
  kvHeads: 2,
  ffn: 172,
  vocabSize: 128256,
  ropeTheta: 500000,
  rmsEps: 1e-5,
};

/** Llama-3.1's "llama3" rope scaling, as in its config.json. */
const ROPE_SCALING = { factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192, rope_type: "llama3" };

export const headDim = (p: LlamaParams): number => p.dModel / p.heads;

function checkParams(p: LlamaParams): void {
  const bad = (what: string) => {
    throw new Error(`tiny llama: ${what}`);
  };
  for (const key of ["layers", "dModel", "heads", "kvHeads", "ffn", "vocabSize"] as const) {
    if (!Number.isInteger(p[key]) || p[key] < 1) bad(`${key} must be a positive integer, got ${p[key]}`);
  }
  if (p.dModel % p.heads !== 0) bad(`dModel ${p.dModel} is not a multiple of heads ${p.heads}`);
  if (headDim(p) % 2 !== 0) bad(`head dimension ${headDim(p)} must be even for rotary embeddings`);
  if (p.heads % p.kvHeads !== 0) bad(`heads ${p.heads} is not a multiple of kvHeads ${p.kvHeads}`);
}

/** Rotary inverse frequencies with llama3 scaling (transformers' _compute_llama3_parameters). */
export function ropeInvFreq(p: LlamaParams): Float32Array {
  const hd = headDim(p);
  const { factor, low_freq_factor: low, high_freq_factor: high, original_max_position_embeddings: context } = ROPE_SCALING;
  const lowWavelen = context / low;
  const highWavelen = context / high;
  return Float32Array.from({ length: hd / 2 }, (_, i) => {
    const freq = 1 / Math.pow(p.ropeTheta, (2 * i) / hd);
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highWavelen) return freq;
    if (wavelen > lowWavelen) return freq / factor;
    const smooth = (context / wavelen - low) / (high - low);
    return ((1 - smooth) * freq) / factor + smooth * freq;
  });
}

/** config.json as transformers writes it for LlamaForCausalLM, plus how this one was generated. */
export function hfConfig(p: LlamaParams): Record<string, unknown> {
  return {
    architectures: ["LlamaForCausalLM"],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: 128000,
    eos_token_id: [128001, 128008, 128009],
    head_dim: headDim(p),
    hidden_act: "silu",
    hidden_size: p.dModel,
    initializer_range: 0.02,
    intermediate_size: p.ffn,
    max_position_embeddings: 131072,
    mlp_bias: false,
    model_type: "llama",
    num_attention_heads: p.heads,
    num_hidden_layers: p.layers,
    num_key_value_heads: p.kvHeads,
    pretraining_tp: 1,
    rms_norm_eps: p.rmsEps,
    rope_scaling: ROPE_SCALING,
    rope_theta: p.ropeTheta,
    tie_word_embeddings: false,
    torch_dtype: "float32",
    use_cache: false,
    vocab_size: p.vocabSize,
    saeflow_generator: { tool: "tools/model/tiny-llama.ts", ...p },
  };
}

export interface LayerWeights {
  inputNorm: Float32Array;
  q: Float32Array;
  k: Float32Array;
  v: Float32Array;
  o: Float32Array;
  postNorm: Float32Array;
  gate: Float32Array;
  up: Float32Array;
  down: Float32Array;
}

export interface LlamaWeights {
  embed: Float32Array;
  layers: LayerWeights[];
  norm: Float32Array;
  lmHead: Float32Array;
}

/**
 * Weights drawn from the seed like transformers' init (normal, std 0.02), except that RMSNorm
 * weights are 1 + N(0, 0.02) instead of exactly 1, so a test can tell a norm's weight from none,
 * and the LM head is N(0, 1/d).
 */
export function makeWeights(p: LlamaParams): LlamaWeights {
  checkParams(p);
  const normal = normalSampler(p.seed);
  const d = p.dModel;
  const hd = headDim(p);
  const std = 0.02;
  const embed = normal(p.vocabSize * d, std);
  const layers = Array.from({ length: p.layers }, () => ({
    inputNorm: normal(d, std, 1),
    q: normal(p.heads * hd * d, std),
    k: normal(p.kvHeads * hd * d, std),
    v: normal(p.kvHeads * hd * d, std),
    o: normal(d * p.heads * hd, std),
    postNorm: normal(d, std, 1),
    gate: normal(p.ffn * d, std),
    up: normal(p.ffn * d, std),
    down: normal(d * p.ffn, std),
  }));
  // The head alone is drawn at 1/sqrt(d): after the final RMSNorm its logits then have unit scale,
  // so the prediction depends on the residual stream. At 0.02 every logit is ~0, the model predicts
  // uniformly whatever the hook holds, and the splice evaluation (LM loss with an SAE in) measures
  // nothing.
  return { embed, layers, norm: normal(d, std, 1), lmHead: normal(p.vocabSize * d, 1 / Math.sqrt(d)) };
}
