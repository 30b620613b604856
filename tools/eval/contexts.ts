import type { ProducerConfig } from "../../services/common/config/index.js";
import { packContexts } from "../../services/producer/dataset/pack.js";
import { START } from "../../services/producer/dataset/position.js";
import { type DatasetKeys, PRODUCER_KEYS, readDocuments, readOptionsOf } from "../../services/producer/dataset/sources.js";
import { loadTokenizerAndDataset } from "../../services/producer/prepare.js";
import { encodeAhead } from "../../services/producer/dataset/ahead.js";

/** What the producer reads and packs with; the evaluation takes its contexts the same way. */
export type CorpusOptions = Pick<
  ProducerConfig,
  "dataset" | "tokenizer" | "textSplit" | "textField" | "tokensField" | "contextLength" | "prependBos"
>;

export interface CorpusSettings {
  /** Dataset warnings (skipped records). */
  log?: (line: string) => void;
  /** What errors call the tokenizer and dataset settings: config keys by default, CLI flags from the CLI. */
  keys?: DatasetKeys;
}

export interface EvalContexts {
  contexts: number[][];
  /** The tokenizer's BOS id: the positions the SAE was not trained on. */
  bosId: number | undefined;
}

/**
 * The first `count` full contexts of the dataset, packed by the producer's own code (BOS first,
 * documents joined by BOS), so the SAE is evaluated on text packed as it was trained on. A dataset
 * shorter than `count` contexts gives what it holds; its padded tail context is left out.
 */
export async function corpusContexts(options: CorpusOptions, count: number, settings: CorpusSettings = {}): Promise<EvalContexts> {
  const { log = () => undefined, keys = PRODUCER_KEYS } = settings;
  // A tokenizer without BOS packs without it here (below) rather than failing.
  const { tokenizer, files } = loadTokenizerAndDataset({ ...options, prependBos: false }, keys);
  const documents = readDocuments(files, readOptionsOf(options, tokenizer.vocabSize, log, keys), START);
  const pack = {
    contextLength: options.contextLength,
    prependBos: options.prependBos && tokenizer.bosId !== undefined,
    excludeBos: true,
    bosId: tokenizer.bosId,
    padId: tokenizer.padId,
  };
  const contexts: number[][] = [];
  for await (const ctx of packContexts(encodeAhead(documents, tokenizer.encode), pack, { cursor: START, contexts: 0, documentsDone: 0 })) {
    if (ctx.length < options.contextLength) break;
    contexts.push(ctx.tokens);
    if (contexts.length === count) break;
  }
  return { contexts, bosId: tokenizer.bosId };
}
