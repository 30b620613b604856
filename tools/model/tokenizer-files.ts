/**
 * Small tokenizer.json / tokenizer_config.json pairs in the two shapes the supported families ship:
 * byte-level BPE (GPT-2, GPT-NeoX/Pythia, Qwen2: every byte a token, GPT-2's byte-to-unicode
 * alphabet, merges on top) and SentencePiece-style BPE with byte fallback (Gemma, Mistral: "▁" for
 * spaces, <0xNN> tokens for bytes outside the vocabulary). A tiny model's vocabulary is this one's,
 * a few hundred ids instead of 50k-256k, so its embedding table stays small; the producer reads
 * these files through the same loader as a real export's.
 */

export type TokenizerStyle = "byte-level" | "sentencepiece";

export interface TokenizerSpec {
  style: TokenizerStyle;
  /** tokenizer_config.json's tokenizer_class, as the family's real tokenizer names it. */
  tokenizerClass: string;
  /** Special tokens in id order; SentencePiece vocabularies start with them, byte-level ones end with them. */
  specials: readonly string[];
  bos?: string;
  eos: string;
  pad?: string;
  unk?: string;
  /** SentencePiece's dummy prefix: Llama/Mistral prepend "▁" to the text, Gemma does not. */
  prependSpace?: boolean;
}

export interface TokenizerFiles {
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  /** Largest id plus one. */
  vocabSize: number;
  ids: Record<string, number>;
}

/** GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to U+0100 on. */
function byteAlphabet(): string[] {
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const chars: string[] = [];
  let next = 256;
  const order = [...Array(256).keys()].filter(printable);
  const rest = [...Array(256).keys()].filter((b) => !printable(b));
  for (const b of order) chars[b] = String.fromCharCode(b);
  for (const b of rest) chars[b] = String.fromCharCode(next++);
  return [...order, ...rest].map((b) => chars[b]!);
}

/** Common English pieces; each merge joins two tokens already in the vocabulary. */
const MERGES = [
  ["_", "t"],
  ["h", "e"],
  ["_t", "he"],
  ["i", "n"],
  ["e", "r"],
  ["a", "n"],
  ["o", "n"],
  ["r", "e"],
  ["_", "a"],
  ["_", "s"],
  ["_", "w"],
  ["_", "o"],
  ["e", "n"],
  ["o", "r"],
  ["a", "t"],
  ["e", "s"],
  ["i", "s"],
  ["n", "d"],
  ["_a", "nd"],
  ["_", "i"],
  ["_o", "f"],
  ["i", "t"],
  ["_", "c"],
  ["in", "g"],
] as const;

const SPACE = { "byte-level": "Ġ", sentencepiece: "▁" } as const;

/** An added token as tokenizer_config.json's added_tokens_decoder writes it (keyed by id). */
const tokenFlags = (content: string) => ({ content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true });
/** The same as tokenizer.json's added_tokens lists it, with its id. */
const addedToken = (id: number, content: string) => ({ id, ...tokenFlags(content) });

/** Token → id, and the merges, in the family's style: SentencePiece puts specials first and bytes as <0xNN>, byte-level puts them last. */
function vocabulary(spec: TokenizerSpec): { vocab: Map<string, number>; merges: string[] } {
  const vocab = new Map<string, number>();
  const add = (token: string) => {
    if (!vocab.has(token)) vocab.set(token, vocab.size);
  };
  const sp = spec.style === "sentencepiece";
  if (sp) {
    spec.specials.forEach(add);
    for (let b = 0; b < 256; b++) add(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    add(SPACE.sentencepiece);
    for (const c of "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:'\"!?-()") add(c);
  } else {
    byteAlphabet().forEach(add);
  }
  const space = SPACE[spec.style];
  const merges = MERGES.map(([a, b]) => [a.replace("_", space), b.replace("_", space)] as const);
  for (const [a, b] of merges) {
    if (!vocab.has(a) || !vocab.has(b)) throw new Error(`tokenizer merge "${a} ${b}" joins a token not in the vocabulary`);
    add(a + b);
  }
  if (!sp) spec.specials.forEach(add);
  return { vocab, merges: merges.map(([a, b]) => `${a} ${b}`) };
}

/** The pipeline around the BPE model: SentencePiece's "▁" normalizer and byte-fallback decoder, or GPT-2's byte-level pieces. */
function pipeline(spec: TokenizerSpec): Record<string, unknown> {
  const replace = (from: string, to: string) => ({ type: "Replace", pattern: { String: from }, content: to });
  if (spec.style === "byte-level") {
    return {
      normalizer: null,
      pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, trim_offsets: true, use_regex: true },
      post_processor: { type: "ByteLevel", add_prefix_space: true, trim_offsets: false, use_regex: true },
      decoder: { type: "ByteLevel", add_prefix_space: true, trim_offsets: true, use_regex: true },
    };
  }
  return {
    normalizer: { type: "Sequence", normalizers: [...(spec.prependSpace ? [{ type: "Prepend", prepend: "▁" }] : []), replace(" ", "▁")] },
    pre_tokenizer: null,
    post_processor: null,
    decoder: {
      type: "Sequence",
      decoders: [
        replace("▁", " "),
        { type: "ByteFallback" },
        { type: "Fuse" },
        ...(spec.prependSpace ? [{ type: "Strip", content: " ", start: 1, stop: 0 }] : []),
      ],
    },
  };
}

/** Builds the two files; ids: specials and merges by content. */
export function makeTokenizerFiles(spec: TokenizerSpec): TokenizerFiles {
  const { vocab, merges } = vocabulary(spec);
  const sp = spec.style === "sentencepiece";
  const ids = Object.fromEntries(vocab);
  const specialIds = spec.specials.map((s) => vocab.get(s)!);
  const tokenizerJson = {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: spec.specials.map((s, i) => addedToken(specialIds[i]!, s)),
    ...pipeline(spec),
    model: {
      type: "BPE",
      dropout: null,
      unk_token: sp ? (spec.unk ?? null) : null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: sp,
      byte_fallback: sp,
      vocab: ids,
      merges,
    },
  };
  const tokenizerConfig = {
    tokenizer_class: spec.tokenizerClass,
    bos_token: spec.bos ?? null,
    eos_token: spec.eos,
    pad_token: spec.pad ?? null,
    unk_token: spec.unk ?? null,
    add_bos_token: sp && spec.bos !== undefined,
    add_eos_token: false,
    clean_up_tokenization_spaces: false,
    model_max_length: 1024,
    added_tokens_decoder: Object.fromEntries(spec.specials.map((s, i) => [String(specialIds[i]), tokenFlags(s)])),
  };
  return { tokenizerJson, tokenizerConfig, vocabSize: vocab.size, ids };
}
