import { existsSync, readFileSync } from "node:fs";
import { ConfigError } from "../../common/config/index.js";
import type { TextTokenizer } from "../tokenizer.js";
import { displayName, PRODUCER_KEYS, type SourceFile } from "./sources.js";

/**
 * What `saeflow pretokenize` records beside each file it writes (`<file>.meta.json`; folders are
 * read for .jsonl, .ndjson and text files only, so the record is never read as data): which field
 * holds the ids and which tokenizer made them, so that a run reading the file with another tokenizer
 * is refused at start instead of training on ids that mean other tokens.
 */
export interface PretokenizedMeta {
  field: string;
  tokenizer: { source: string; fingerprint: string; vocabSize: number };
  documents: number;
  tokens: number;
}

export const metaPath = (file: string): string => `${file}.meta.json`;

/** The record beside `file`, when pretokenize left one; a record that cannot be read is a config error. */
function metaOf(file: string, key: string): PretokenizedMeta | undefined {
  const path = metaPath(file);
  if (!existsSync(path)) return undefined;
  try {
    const meta = JSON.parse(readFileSync(path, "utf8")) as PretokenizedMeta;
    if (typeof meta.field === "string" && typeof meta.tokenizer?.fingerprint === "string") return meta;
  } catch {
    // named below, with the file
  }
  throw ConfigError.at(key, `${displayName(path)} is not a record saeflow pretokenize wrote; remove it or pretokenize again`);
}

/**
 * Checks every JSONL file that saeflow pretokenize wrote against how the run reads it: its ids must
 * come from `tokenizer`, and `tokensField` must name the field that holds them. Files without a
 * record (ids made elsewhere, or text) are read as configured.
 */
export function checkPretokenized(files: SourceFile[], tokensField: string, tokenizer: TextTokenizer, keys = PRODUCER_KEYS): void {
  for (const file of files) {
    if (file.format !== "jsonl") continue;
    const meta = metaOf(file.path, keys.dataset);
    if (!meta) continue;
    const name = displayName(file.path);
    if (tokensField !== meta.field)
      throw ConfigError.at(
        keys.tokensField,
        `${name} holds token ids (saeflow pretokenize) in "${meta.field}"; set ${keys.tokensField}=${meta.field}${tokensField ? "" : " to read them"}`,
      );
    if (meta.tokenizer.fingerprint !== tokenizer.fingerprint)
      throw ConfigError.at(
        keys.tokenizer,
        `${name} was pretokenized with ${meta.tokenizer.source} (tokenizer.json sha256 ${meta.tokenizer.fingerprint}), not with ${tokenizer.source} (${tokenizer.fingerprint}): its ids would mean other tokens; pretokenize again with this tokenizer or use that one`,
      );
  }
}
