import type { TokenizerSpec } from "./tokenizer-files.js";

/**
 * The decoder families besides Llama that saeflow reads, as architecture facts (what transformers'
 * modeling_<family>.py computes) and module paths (what torch.onnx turns into node-name scopes and
 * initializer names). One generic graph builder (decoder-graph.ts) and one reference forward
 * (decoder-reference.ts) follow these facts, so each family differs from the others only here.
 */

export const FAMILY_NAMES = ["gpt2", "gpt_neox", "gemma2", "qwen2", "mistral"] as const;
export type FamilyName = (typeof FAMILY_NAMES)[number];

export type NormKind = "layer" | "rms" | "rms_one_plus";
export type MlpKind = "gelu_new" | "gelu" | "silu_gated" | "gelu_tanh_gated";

/** Module paths below the model root; "{L}" stands for the layer index. */
export interface ModulePaths {
  embed: string;
  /** Learned position table (GPT-2's wpe). */
  positions?: string;
  /** Shared rotary tables, in transformers ≥ 4.45 one module on the model. */
  rotary?: string;
  layer: string;
  attnNorm: string;
  /** Gemma 2's norm on the attention output, before its residual Add. */
  attnPostNorm?: string;
  attn: string;
  /** One fused projection (GPT-2's c_attn, GPT-NeoX's query_key_value), else q/k/v. */
  qkv?: string;
  q?: string;
  k?: string;
  v?: string;
  o: string;
  mlpNorm: string;
  mlpPostNorm?: string;
  mlp: string;
  gate?: string;
  up: string;
  down: string;
  act: string;
  finalNorm: string;
  head: string;
}

export interface FamilySpec {
  name: FamilyName;
  /** As people say it, for messages and the README. */
  title: string;
  architecture: string;
  norm: NormKind;
  /** GPT-2's Conv1D: weights stored [in, out], applied with addmm (ONNX Gemm on a 2-D view). */
  conv1d: boolean;
  /** How one fused projection lays out q, k, v: GPT-2 as three blocks, GPT-NeoX per head. */
  fusedQkv?: "blocks" | "per_head";
  qkvBias: boolean;
  oBias: boolean;
  mlpBias: boolean;
  mlp: MlpKind;
  /** GPT-NeoX's use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)). */
  parallel: boolean;
  /** Gemma's embedding scaled by sqrt(hidden_size). */
  embedScale: boolean;
  /** Which layers use the sliding window when one is set: Mistral all, Gemma 2 the even ones. */
  sliding: "all" | "even" | "none";
  tiedEmbeddings: boolean;
  /** The opset optimum exported the family with (1.x: 14; optimum-onnx: 18), which changes ReduceMean/LayerNorm ops. */
  opset: number;
  paths: ModulePaths;
  tokenizer: TokenizerSpec;
}

const LLAMA_PATHS: ModulePaths = {
  embed: "model/embed_tokens",
  rotary: "model/rotary_emb",
  layer: "model/layers.{L}",
  attnNorm: "input_layernorm",
  attn: "self_attn",
  q: "q_proj",
  k: "k_proj",
  v: "v_proj",
  o: "o_proj",
  mlpNorm: "post_attention_layernorm",
  mlp: "mlp",
  gate: "gate_proj",
  up: "up_proj",
  down: "down_proj",
  act: "act_fn",
  finalNorm: "model/norm",
  head: "lm_head",
};

export const FAMILIES: Record<FamilyName, FamilySpec> = {
  gpt2: {
    name: "gpt2",
    title: "GPT-2",
    architecture: "GPT2LMHeadModel",
    norm: "layer",
    conv1d: true,
    fusedQkv: "blocks",
    qkvBias: true,
    oBias: true,
    mlpBias: true,
    mlp: "gelu_new",
    parallel: false,
    embedScale: false,
    sliding: "none",
    tiedEmbeddings: true,
    opset: 14,
    paths: {
      embed: "transformer/wte",
      positions: "transformer/wpe",
      layer: "transformer/h.{L}",
      attnNorm: "ln_1",
      attn: "attn",
      qkv: "c_attn",
      o: "c_proj",
      mlpNorm: "ln_2",
      mlp: "mlp",
      up: "c_fc",
      down: "c_proj",
      act: "act",
      finalNorm: "transformer/ln_f",
      head: "lm_head",
    },
    tokenizer: {
      style: "byte-level",
      tokenizerClass: "GPT2Tokenizer",
      specials: ["<|endoftext|>"],
      bos: "<|endoftext|>",
      eos: "<|endoftext|>",
    },
  },
  gpt_neox: {
    name: "gpt_neox",
    title: "GPT-NeoX (Pythia)",
    architecture: "GPTNeoXForCausalLM",
    norm: "layer",
    conv1d: false,
    fusedQkv: "per_head",
    qkvBias: true,
    oBias: true,
    mlpBias: true,
    mlp: "gelu",
    parallel: true,
    embedScale: false,
    sliding: "none",
    tiedEmbeddings: false,
    opset: 18,
    paths: {
      embed: "gpt_neox/embed_in",
      rotary: "gpt_neox/rotary_emb",
      layer: "gpt_neox/layers.{L}",
      attnNorm: "input_layernorm",
      attn: "attention",
      qkv: "query_key_value",
      o: "dense",
      mlpNorm: "post_attention_layernorm",
      mlp: "mlp",
      up: "dense_h_to_4h",
      down: "dense_4h_to_h",
      act: "act",
      finalNorm: "gpt_neox/final_layer_norm",
      head: "embed_out",
    },
    tokenizer: {
      style: "byte-level",
      tokenizerClass: "GPTNeoXTokenizer",
      specials: ["<|endoftext|>", "<|padding|>"],
      bos: "<|endoftext|>",
      eos: "<|endoftext|>",
    },
  },
  gemma2: {
    name: "gemma2",
    title: "Gemma 2",
    architecture: "Gemma2ForCausalLM",
    norm: "rms_one_plus",
    conv1d: false,
    qkvBias: false,
    oBias: false,
    mlpBias: false,
    mlp: "gelu_tanh_gated",
    parallel: false,
    embedScale: true,
    sliding: "even",
    tiedEmbeddings: true,
    opset: 18,
    paths: {
      ...LLAMA_PATHS,
      attnPostNorm: "post_attention_layernorm",
      mlpNorm: "pre_feedforward_layernorm",
      mlpPostNorm: "post_feedforward_layernorm",
    },
    tokenizer: {
      style: "sentencepiece",
      tokenizerClass: "GemmaTokenizer",
      specials: ["<pad>", "<eos>", "<bos>", "<unk>"],
      bos: "<bos>",
      eos: "<eos>",
      pad: "<pad>",
      unk: "<unk>",
    },
  },
  qwen2: {
    name: "qwen2",
    title: "Qwen2",
    architecture: "Qwen2ForCausalLM",
    norm: "rms",
    conv1d: false,
    qkvBias: true,
    oBias: false,
    mlpBias: false,
    mlp: "silu_gated",
    parallel: false,
    embedScale: false,
    sliding: "none",
    tiedEmbeddings: true,
    opset: 14,
    paths: LLAMA_PATHS,
    // Qwen2's tokenizer has no BOS token: its contexts start with the text itself.
    tokenizer: {
      style: "byte-level",
      tokenizerClass: "Qwen2Tokenizer",
      specials: ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      eos: "<|endoftext|>",
      pad: "<|endoftext|>",
    },
  },
  mistral: {
    name: "mistral",
    title: "Mistral",
    architecture: "MistralForCausalLM",
    norm: "rms",
    conv1d: false,
    qkvBias: false,
    oBias: false,
    mlpBias: false,
    mlp: "silu_gated",
    parallel: false,
    embedScale: false,
    sliding: "all",
    tiedEmbeddings: false,
    opset: 18,
    paths: LLAMA_PATHS,
    tokenizer: {
      style: "sentencepiece",
      tokenizerClass: "LlamaTokenizer",
      specials: ["<unk>", "<s>", "</s>"],
      bos: "<s>",
      eos: "</s>",
      unk: "<unk>",
      prependSpace: true,
    },
  },
};

/** The sizes of one generated model; what a family does not use is ignored. */
export interface DecoderParams {
  family: FamilyName;
  seed: number;
  layers: number;
  dModel: number;
  heads: number;
  kvHeads: number;
  headDim: number;
  ffn: number;
  /** Set from the tokenizer; kept here so the graph and reference need nothing else. */
  vocabSize: number;
  /** GPT-2's learned position table length. */
  maxPositions: number;
  eps: number;
  ropeTheta: number;
  /** GPT-NeoX's rotary_pct: the fraction of each head's dimensions that are rotated. */
  rotaryPct: number;
  /** Keys a query sees, itself included (transformers' sliding_window); 0 for none. */
  slidingWindow: number;
  /** Gemma 2 scales scores by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5. */
  queryPreAttnScalar: number;
  /** Gemma 2's tanh caps on attention scores and final logits; 0 for none. */
  attnSoftcap: number;
  finalSoftcap: number;
}

/**
 * Toy sizes: width 64, two layers (Gemma 2's layer 0 slides, layer 1 is global), a window of 4 so
 * it matters in a 16-token context, and softcaps small enough to bend this model's scores (the real
 * 50 and 30 would leave them untouched at this scale).
 */
export function tinyParams(family: FamilyName, vocabSize: number, overrides: Partial<DecoderParams> = {}): DecoderParams {
  const base: DecoderParams = {
    family,
    seed: 0,
    layers: 2,
    dModel: 64,
    heads: 4,
    kvHeads: 4,
    headDim: 16,
    ffn: 128,
    vocabSize,
    maxPositions: 256,
    eps: 1e-5,
    ropeTheta: 10000,
    rotaryPct: 0,
    slidingWindow: 0,
    queryPreAttnScalar: 0,
    attnSoftcap: 0,
    finalSoftcap: 0,
  };
  const perFamily: Record<FamilyName, Partial<DecoderParams>> = {
    gpt2: {},
    gpt_neox: { rotaryPct: 0.25 },
    gemma2: { kvHeads: 2, headDim: 24, eps: 1e-6, slidingWindow: 4, queryPreAttnScalar: 32, attnSoftcap: 1, finalSoftcap: 3 },
    qwen2: { kvHeads: 2, eps: 1e-6, ropeTheta: 1000000 },
    mistral: { kvHeads: 2, slidingWindow: 4 },
  };
  const params = { ...base, ...perFamily[family], ...overrides };
  checkParams(params);
  return params;
}

export function checkParams(p: DecoderParams): void {
  const bad = (what: string) => {
    throw new Error(`tiny ${p.family}: ${what}`);
  };
  for (const key of ["layers", "dModel", "heads", "kvHeads", "headDim", "ffn", "vocabSize", "maxPositions"] as const) {
    if (!Number.isInteger(p[key]) || p[key] < 1) bad(`${key} must be a positive integer, got ${p[key]}`);
  }
  if (p.heads % p.kvHeads !== 0) bad(`heads ${p.heads} is not a multiple of kvHeads ${p.kvHeads}`);
  const spec = FAMILIES[p.family];
  if (spec.fusedQkv && (p.kvHeads !== p.heads || p.headDim * p.heads !== p.dModel)) {
    bad(`a fused q/k/v projection needs kvHeads = heads and headDim * heads = dModel`);
  }
  if (spec.paths.positions === undefined && rotaryDims(p) % 2 !== 0) bad(`rotary dimensions ${rotaryDims(p)} must be even`);
}

/** Rotated dimensions per head: all of them, or GPT-NeoX's rotary_pct share. */
export const rotaryDims = (p: DecoderParams): number => (p.family === "gpt_neox" ? Math.floor(p.headDim * p.rotaryPct) : p.headDim);

/** Whether layer `l` attends through the sliding window. */
export function slides(p: DecoderParams, l: number): boolean {
  const mode = FAMILIES[p.family].sliding;
  return p.slidingWindow > 0 && (mode === "all" || (mode === "even" && l % 2 === 0));
}

/** The score scale: 1/sqrt(head_dim), or Gemma 2's query_pre_attn_scalar^-0.5. */
export const attnScale = (p: DecoderParams): number => 1 / Math.sqrt(p.queryPreAttnScalar > 0 ? p.queryPreAttnScalar : p.headDim);

export const invFreq = (p: DecoderParams): Float32Array => {
  const dims = rotaryDims(p);
  return Float32Array.from({ length: dims / 2 }, (_, i) => 1 / Math.pow(p.ropeTheta, (2 * i) / dims));
};
