import { ConfigError, type RunConfig } from "../common/config/index.js";
import { createClient } from "../common/grpc/adapter.js";
import { poolWidth, shardsHolding } from "../common/shards.js";
import { BufferService } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { type BatchSource, checkBufferPool, type StreamOf } from "./batches.js";
import { MergedBatches } from "./merged.js";
import { placementOf, widenedByStream } from "./placement.js";
import { PrefetchedBatches } from "./prefetch.js";

/** Waits for the shard to answer and checks it serves the hook point's pool at its width. */
async function checkShard(config: RunConfig, stream: StreamOf): Promise<void> {
  const client = createClient(BufferService, stream.address, config.transport);
  try {
    await client.ready(60_000);
    await checkBufferPool(client, config, stream);
  } finally {
    client.close();
  }
}

/** Every Batches stream a hook point's Training reads: one per buffer shard holding its pool. */
export function streamsOf(config: RunConfig, hookPoint: string): StreamOf[] {
  const shards = shardsHolding(config.buffer, hookPoint);
  if (shards.length === 0) throw ConfigError.at("buffer.shards", `no shard holds the pool ${hookPoint}`);
  return shards.map((s) => ({ hookPoint, address: s.address }));
}

/**
 * A hook point's batches from every buffer shard holding it, once each answers and serves the pool:
 * each shard's stream received on its own thread (prefetch.ts), merged batch by batch (merged.ts).
 */
export async function bufferSource(config: RunConfig, hookPoint: string, log: (line: string) => void): Promise<BatchSource> {
  const streams = streamsOf(config, hookPoint);
  await Promise.all(streams.map((s) => checkShard(config, s)));
  const widen = widenedByStream(placementOf(config.trainer), poolWidth(config.buffer, hookPoint));
  const sources = streams.map((s) => new PrefetchedBatches(config, s, widen, 1, log));
  return sources.length === 1 ? sources[0]! : new MergedBatches(sources);
}
