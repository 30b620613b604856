import { once } from "node:events";
import { createWriteStream, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { finished } from "node:stream/promises";
import { SingleBar } from "cli-progress";
import { ConfigError, type ProducerConfig } from "../../services/common/config/index.js";
import { encodeAhead } from "../../services/producer/dataset/ahead.js";
import { START } from "../../services/producer/dataset/position.js";
import { metaPath, type PretokenizedMeta } from "../../services/producer/dataset/pretokenized.js";
import { readDocuments, readOptionsOf } from "../../services/producer/dataset/sources.js";
import { loadTokenizerAndDataset } from "../../services/producer/prepare.js";

/** The field `saeflow pretokenize` writes ids to: the name Hugging Face datasets give tokenized text. */
export const TOKENS_FIELD = "input_ids";

export type PretokenizeOptions = Pick<ProducerConfig, "dataset" | "tokenizer" | "textSplit" | "textField" | "tokensField">;

export interface Pretokenized {
  documents: number;
  tokens: number;
}

/**
 * Tokenizes a dataset once, into one JSONL record of token ids per document (`{"input_ids": [...]}`),
 * in the order and with the splitting a producer reads it, so that a producer given the file and
 * `producer.tokensField: input_ids` packs exactly the contexts it would have packed from the text,
 * and spends no CPU tokenizing however many runs read it. Records the producer would skip are
 * skipped here too (and logged). The file appears only when complete: it is written beside `out`
 * and renamed; then `<out>.meta.json` records the field and the tokenizer (checkPretokenized). A
 * record left from an earlier `out` goes first, so the new ids never sit beside another tokenizer's
 * record, even if this stops between the two.
 */
export async function pretokenize(p: PretokenizeOptions, out: string, log: (line: string) => void): Promise<Pretokenized> {
  // BOS goes in when contexts are packed, not into the ids: whether the tokenizer has one is the run's concern.
  const { tokenizer, files } = loadTokenizerAndDataset({ ...p, prependBos: false });
  const target = resolve(out);
  if (files.some((f) => resolve(f.path) === target))
    throw ConfigError.at("producer.dataset", `${out} is the output of pretokenize and part of the dataset it reads; write it elsewhere`);
  const sizes = files.map((f) => statSync(f.path).size);
  const before = sizes.map((_, i) => sizes.slice(0, i).reduce((a, b) => a + b, 0));
  const bar = new SingleBar({
    format: "pretokenize [{bar}] {percentage}% | {documents} documents, {tokens} tokens",
    stream: process.stderr,
    hideCursor: true,
  });
  bar.start(Math.max(1, before.at(-1)! + sizes.at(-1)!), 0, { documents: 0, tokens: 0 });
  const partial = `${out}.partial`;
  const stream = createWriteStream(partial);
  // A write that fails (no room, a folder in the way) ends the loop with its error, not as an unhandled 'error' event.
  let failed: Error | undefined;
  stream.on("error", (err) => (failed ??= err));
  const done: Pretokenized = { documents: 0, tokens: 0 };
  // Only a file this made is removed on failure.
  let opened = false;
  try {
    await once(stream, "open");
    opened = true;
    const documents = readDocuments(files, readOptionsOf(p, tokenizer.vocabSize, log), START);
    for await (const { doc, ids } of encodeAhead(documents, tokenizer.encode)) {
      if (failed) throw failed;
      if (!stream.write(`${JSON.stringify({ [TOKENS_FIELD]: ids })}\n`)) await once(stream, "drain");
      done.documents++;
      done.tokens += ids.length;
      if (done.documents % 1024 === 0) bar.update(before[doc.fileIndex]! + doc.offset, done);
    }
    stream.end();
    await finished(stream);
    rmSync(metaPath(out), { force: true });
    renameSync(partial, out);
    const meta: PretokenizedMeta = {
      field: TOKENS_FIELD,
      tokenizer: { source: tokenizer.source, fingerprint: tokenizer.fingerprint, vocabSize: tokenizer.vocabSize },
      ...done,
    };
    const record = metaPath(out);
    writeFileSync(`${record}.partial`, `${JSON.stringify(meta, null, 2)}\n`);
    renameSync(`${record}.partial`, record);
    bar.update(bar.getTotal(), done);
  } catch (err) {
    stream.destroy();
    if (opened) rmSync(partial, { force: true });
    throw failed ? new Error(`pretokenize cannot write ${out}: ${failed.message}`) : err;
  } finally {
    bar.stop();
  }
  return done;
}
