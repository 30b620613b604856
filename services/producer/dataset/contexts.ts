import { encodeAhead } from "./ahead.js";
import { packContexts, type Context, type PackOptions } from "./pack.js";
import type { Position } from "./position.js";
import { shardDocuments, type Shard } from "./shard.js";
import { readDocuments, type ReadOptions, type SourceFile } from "./sources.js";

export interface ContextSource {
  files: SourceFile[];
  read: ReadOptions;
  shard: Shard;
  pack: PackOptions;
  encode: (texts: readonly string[]) => Promise<number[][]>;
  /** Passes over the shard; 0 repeats until the consumer stops pulling. */
  epochs: number;
}

/** This producer's contexts from `from` on, epoch after epoch; ends when the epochs are done. */
export async function* shardContexts(source: ContextSource, from: Position): AsyncGenerator<Context> {
  let { cursor, contexts, documentsDone } = from;
  while (source.epochs === 0 || cursor.epoch < source.epochs) {
    const documents = shardDocuments(readDocuments(source.files, source.read, cursor), source.shard);
    let packed = 0;
    for await (const ctx of packContexts(encodeAhead(documents, source.encode), source.pack, { cursor, contexts, documentsDone })) {
      packed++;
      contexts = ctx.id + 1;
      documentsDone = ctx.documentsDone;
      yield ctx;
    }
    const fromStart = cursor.fileIndex === 0 && cursor.offset === 0 && cursor.tokenOffset === 0;
    if (!packed && fromStart) {
      source.read.log(`dataset: shard ${source.shard.index}/${source.shard.count} holds no tokens; nothing to produce`);
      return;
    }
    cursor = { epoch: cursor.epoch + 1, fileIndex: 0, offset: 0, documentIndex: 0, tokenOffset: 0 };
  }
}
