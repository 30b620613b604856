import { createHash, randomUUID } from "node:crypto";
import { join } from "node:path";
import { ConfigError, type ProducerConfig, type RunConfig } from "../common/config/index.js";
import { DTYPE_BYTES, dtypeFromName } from "../common/tensor-codec.js";
import { freshPosition, type Position, PositionStore } from "./dataset/position.js";
import { checkPretokenized } from "./dataset/pretokenized.js";
import { type DatasetKeys, PRODUCER_KEYS, resolveSources, type SourceFile } from "./dataset/sources.js";
import type { ModelSession } from "./session.js";
import { loadTokenizer, type TextTokenizer } from "./tokenizer.js";

/** What a producer knows before it opens anything: its tokenizer, its files and where it starts. */
export interface Prepared {
  tokenizer: TextTokenizer;
  files: SourceFile[];
  store: PositionStore;
  /** The saved position when resuming, else the start of the shard. */
  from: Position;
}

/** What the saved position is only meaningful for: files, shard, splitting, tokenizer, packing. */
function fingerprint(config: RunConfig, files: SourceFile[]): string {
  const p = config.producer;
  // tokensField joins only when set, so positions saved before it existed still match.
  const what = [p.dataset, files.length, p.textSplit, p.textField, p.shardIndex, p.shardCount, p.tokenizer, p.contextLength, p.prependBos];
  if (p.tokensField) what.push(p.tokensField);
  return createHash("sha256").update(JSON.stringify(what)).digest("hex").slice(0, 16);
}

/**
 * The tokenizer and the dataset's files, checked against each other and the packing (BOS, the
 * records of pretokenized files), failing with the key at fault (`keys`: a CLI names its flags).
 * `saeflow up` runs it before starting anything; the producer at start; pretokenize and the
 * evaluation before they read.
 */
export function loadTokenizerAndDataset(
  p: Pick<ProducerConfig, "tokenizer" | "prependBos" | "dataset" | "tokensField">,
  keys: DatasetKeys = PRODUCER_KEYS,
): {
  tokenizer: TextTokenizer;
  files: SourceFile[];
} {
  const tokenizer = loadTokenizer(p.tokenizer, keys.tokenizer);
  if (p.prependBos && tokenizer.bosId === undefined) {
    throw ConfigError.at(
      "producer.prependBos",
      `${p.tokenizer} defines no BOS token (no bos_token in tokenizer_config.json); set producer.prependBos=false`,
    );
  }
  const files = resolveSources(p.dataset, keys.dataset);
  checkPretokenized(files, p.tokensField, tokenizer, keys);
  return { tokenizer, files };
}

/** Loads the tokenizer, resolves the dataset and reads the saved position, failing with the key at fault. */
export function prepare(config: RunConfig, id: string, log: (line: string) => void): Prepared {
  const p = config.producer;
  const { tokenizer, files } = loadTokenizerAndDataset(p);
  const store = new PositionStore(p.stateFile || join(config.run.dir, `${id}.position.json`), fingerprint(config, files));
  const saved = p.resume ? store.load() : undefined;
  if (saved) {
    const c = saved.cursor;
    log(`${id}: resuming at file ${c.fileIndex} byte ${c.offset} (epoch ${c.epoch}, ${saved.contexts} contexts done)`);
  }
  // A position saved before lineages existed goes on under a new one: its ids were never announced.
  const from = saved ? { ...saved, lineage: saved.lineage || randomUUID() } : freshPosition();
  return { tokenizer, files, store, from };
}

/** Cross-checks that need the loaded tokenizer and model, each naming the key at fault. */
export function checkAgainstRun(config: RunConfig, tokenizer: TextTokenizer, model: ModelSession): void {
  const p = config.producer;
  if (model.vocabSize !== undefined && tokenizer.vocabSize > model.vocabSize) {
    throw ConfigError.at(
      "producer.tokenizer",
      `${tokenizer.source} has ${tokenizer.vocabSize} ids but the model's vocabulary is ${model.vocabSize}`,
    );
  }
  p.hookPoints.forEach((hook, i) => {
    const pool = config.buffer.hookPoints.find((h) => h.name === hook);
    if (pool && pool.dModel !== model.dModel) {
      throw ConfigError.at(
        `producer.hookPoints.${i}`,
        `${hook} is ${model.dModel} wide in the model but its buffer pool has dModel ${pool.dModel}`,
      );
    }
  });
  const chunkBytes = p.batchContexts * p.contextLength * model.dModel * DTYPE_BYTES[dtypeFromName(p.dtype)];
  if (chunkBytes > config.transport.maxMessageBytes - (1 << 20)) {
    throw ConfigError.at(
      "producer.batchContexts",
      `a chunk of ${p.batchContexts} contexts x ${p.contextLength} tokens x ${model.dModel} is ${chunkBytes} bytes, over transport.maxMessageBytes`,
    );
  }
}
