import type { Document } from "./sources.js";

/** This producer's part of the dataset. */
export interface Shard {
  index: number;
  count: number;
}

/**
 * Documents are dealt round-robin by their dataset-wide index: every producer reads the same files
 * in the same order and keeps index % count === shard index. The shards are disjoint, cover the
 * dataset once, stay balanced however unequal the files are, and need no coordination.
 */
export const inShard = (documentIndex: number, shard: Shard): boolean => documentIndex % shard.count === shard.index;

export async function* shardDocuments(documents: AsyncIterable<Document>, shard: Shard): AsyncGenerator<Document> {
  for await (const doc of documents) if (inShard(doc.index, shard)) yield doc;
}
