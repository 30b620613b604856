import { createReadStream, existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { ConfigError, type ProducerConfig } from "../../common/config/index.js";
import { type Body, bodyOfRecord, type TokenIds } from "./jsonl.js";

/** One file of the dataset, in the sorted order every producer agrees on. */
export interface SourceFile {
  path: string;
  format: "text" | "jsonl";
}

/** One document: a line, paragraph or file of text, or one JSONL record (its text or its token ids). */
export type Document = Body & {
  /** Index over the whole dataset (all shards), in file order; sharding and resume use it. */
  index: number;
  fileIndex: number;
  /** Byte offset of the document's first line in its file, where a resumed reader starts. */
  offset: number;
};

export interface ReadOptions {
  textSplit: "line" | "paragraph" | "file";
  textField: string;
  /** When set, JSONL records hold token ids in this field instead of text (plain-text files are still text). */
  tokens?: TokenIds;
  log: (line: string) => void;
}

/** The settings a dataset's errors and skips name: the producer's config keys, or a CLI's flags. */
export interface DatasetKeys {
  dataset: string;
  tokenizer: string;
  tokensField: string;
}

export const PRODUCER_KEYS: DatasetKeys = {
  dataset: "producer.dataset",
  tokenizer: "producer.tokenizer",
  tokensField: "producer.tokensField",
};

/** How a producer's settings read the dataset; token ids given in records must be below `vocabSize`. */
export function readOptionsOf(
  p: Pick<ProducerConfig, "textSplit" | "textField" | "tokensField">,
  vocabSize: number,
  log: (line: string) => void,
  keys: TokenIds["keys"] = PRODUCER_KEYS,
): ReadOptions {
  const tokens = p.tokensField ? { field: p.tokensField, vocabSize, keys } : undefined;
  return { textSplit: p.textSplit, textField: p.textField, tokens, log };
}

/** Where to start reading: a document boundary in a file. */
export interface ReadFrom {
  fileIndex: number;
  offset: number;
  documentIndex: number;
}

export const BUILTIN_CORPUS = "builtin:corpus";
const TEXT_EXTENSIONS = [".txt", ".text", ".md"];
const JSONL_EXTENSIONS = [".jsonl", ".ndjson"];

const repoRoot = fileURLToPath(new URL("../../../", import.meta.url));
const byCodeUnits = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

function walk(dir: string, out: string[], skip: (name: string) => boolean): void {
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    if (entry.name.startsWith(".") || skip(entry.name)) continue;
    const path = join(dir, entry.name);
    if (entry.isDirectory()) walk(path, out, skip);
    else if (entry.isFile()) out.push(path);
  }
}

/**
 * The default corpus: every .md file (READMEs, changelogs, guides; English prose) of every package
 * package-lock.json lists as a production dependency, direct or not, leaving out each package's
 * nested node_modules (those are packages of their own), sorted by path. `npm ci` installs exactly
 * these folders with or without dev dependencies, so every machine reads the same ~1.3 MB of text
 * (about 350k Llama-3.1 tokens) in the same order.
 */
export function builtinCorpus(root = repoRoot): string[] {
  const lock = JSON.parse(readFileSync(join(root, "package-lock.json"), "utf8")) as { packages?: Record<string, { dev?: boolean }> };
  const files: string[] = [];
  for (const [folder, entry] of Object.entries(lock.packages ?? {})) {
    const dir = join(root, folder);
    if (folder && !entry.dev && existsSync(dir)) walk(dir, files, (n) => n === "node_modules");
  }
  return files.filter((f) => f.toLowerCase().endsWith(".md")).sort(byCodeUnits);
}

const formatOf = (path: string): SourceFile["format"] | undefined => {
  const lower = path.toLowerCase();
  if (JSONL_EXTENSIONS.some((e) => lower.endsWith(e))) return "jsonl";
  if (TEXT_EXTENSIONS.some((e) => lower.endsWith(e))) return "text";
  return undefined;
};

/**
 * Expands the configured dataset entries into files. A folder contributes its .txt, .text, .md,
 * .jsonl and .ndjson files (recursively, hidden ones left out); a file named directly is read as
 * JSONL when it ends in .jsonl/.ndjson and as plain text otherwise. The result is sorted within
 * each entry, so every producer numbers documents alike.
 */
export function resolveSources(entries: string[], key = "producer.dataset"): SourceFile[] {
  const files: SourceFile[] = [];
  entries.forEach((entry, i) => {
    const where = `${key}.${i}`;
    if (entry === BUILTIN_CORPUS) {
      const corpus = builtinCorpus();
      if (!corpus.length)
        throw ConfigError.at(where, `${BUILTIN_CORPUS} found no .md files under ${join(repoRoot, "node_modules")}; run npm ci`);
      files.push(...corpus.map((path) => ({ path, format: "text" as const })));
      return;
    }
    if (!existsSync(entry)) throw ConfigError.at(where, `${entry} does not exist`);
    if (statSync(entry).isDirectory()) {
      const found: string[] = [];
      walk(entry, found, () => false);
      const usable = found.filter((f) => formatOf(f)).sort(byCodeUnits);
      if (!usable.length) throw ConfigError.at(where, `folder ${entry} holds no .txt, .md, .jsonl or .ndjson files`);
      files.push(...usable.map((path) => ({ path, format: formatOf(path)! })));
      return;
    }
    files.push({ path: entry, format: formatOf(entry) === "jsonl" ? "jsonl" : "text" });
  });
  return files;
}

/** A name for a file in status and errors: relative to the working folder when inside it. */
export function displayName(path: string): string {
  const rel = relative(process.cwd(), path);
  return rel.startsWith("..") ? path : rel;
}

interface Line {
  offset: number;
  text: string;
}

/** Lines of a file from byte `start`, each with its byte offset; reads 64 KiB at a time. */
async function* readLines(path: string, start: number): AsyncGenerator<Line> {
  let carry: Buffer = Buffer.alloc(0);
  let carryOffset = start;
  for await (const piece of createReadStream(path, { start, highWaterMark: 64 << 10 })) {
    const buf: Buffer = carry.length ? Buffer.concat([carry, piece as Buffer]) : (piece as Buffer);
    let from = 0;
    for (let nl = buf.indexOf(10, from); nl !== -1; nl = buf.indexOf(10, from)) {
      const end = nl > from && buf[nl - 1] === 13 ? nl - 1 : nl;
      yield { offset: carryOffset + from, text: buf.toString("utf8", from, end) };
      from = nl + 1;
    }
    carry = buf.subarray(from);
    carryOffset += from;
  }
  if (carry.length) yield { offset: carryOffset, text: carry.toString("utf8").replace(/\r$/, "") };
}

const isBlank = (text: string): boolean => text.trim() === "";

/** Documents of one file as [offset, body], split per `textSplit` (JSONL: one per record). */
async function* fileDocuments(file: SourceFile, start: number, options: ReadOptions): AsyncGenerator<[number, Body]> {
  if (file.format === "jsonl") {
    for await (const line of readLines(file.path, start)) {
      if (isBlank(line.text)) continue;
      const body = bodyOfRecord(line.text, options.textField, options.tokens);
      if ("error" in body) options.log(`dataset: ${displayName(file.path)} at byte ${line.offset}: ${body.error}; record skipped`);
      else yield [line.offset, body];
    }
    return;
  }
  let para: string[] = [];
  let paraOffset = start;
  for await (const line of readLines(file.path, start)) {
    if (options.textSplit === "line") {
      if (!isBlank(line.text)) yield [line.offset, { text: line.text }];
      continue;
    }
    if (options.textSplit === "paragraph" && isBlank(line.text)) {
      if (para.length) yield [paraOffset, { text: para.join("\n") }];
      para = [];
      continue;
    }
    if (!para.length) paraOffset = line.offset;
    para.push(line.text);
  }
  if (para.length && !isBlank(para.join("\n"))) yield [paraOffset, { text: para.join("\n") }];
}

/**
 * Streams the documents of `files` from `from` on, one file open at a time, numbering them over
 * the whole dataset. Nothing is read ahead of what the caller pulls.
 */
export async function* readDocuments(files: SourceFile[], options: ReadOptions, from: ReadFrom): AsyncGenerator<Document> {
  let index = from.documentIndex;
  for (let fileIndex = from.fileIndex; fileIndex < files.length; fileIndex++) {
    const start = fileIndex === from.fileIndex ? from.offset : 0;
    for await (const [offset, body] of fileDocuments(files[fileIndex]!, start, options)) {
      yield { ...body, index: index++, fileIndex, offset };
    }
  }
}
