import { ConfigError, type RunConfig } from "../../services/common/config/index.js";
import { shardsOf, trainerHookPoints } from "../../services/common/shards.js";
import { DTYPE_BYTES, dtypeFromName } from "../../services/common/tensor-codec.js";
import type { Layout } from "./model.js";

/** The block a hook point reads (blocks.<layer>.<kind>). */
function layerOf(hookPoint: string): number {
  const m = /^blocks\.(\d+)\./.exec(hookPoint);
  if (!m) throw ConfigError.at("producer.hookPoints", `"${hookPoint}" is not blocks.<layer>.<kind>`);
  return Number(m[1]);
}

/**
 * The run a config describes, as the plan counts it: the shard table (buffer.shards, or one shard
 * holding every pool), producer.shardCount producers, trainer.shardCount trainer processes each
 * with its share of trainer.hookPoints, the sweep trainer.saes on each.
 */
export function layoutOf(config: RunConfig): Layout {
  const shards = shardsOf(config.buffer);
  const count = config.trainer.shardCount;
  return {
    pools: config.buffer.hookPoints.map((h) => ({
      name: h.name,
      dModel: h.dModel,
      shards: shards.filter((s) => s.hookPoints.includes(h.name)).map((s) => s.index),
    })),
    shards: shards.length,
    producers: config.producer.shardCount,
    trainers: Array.from({ length: count }, (_, index) => ({ index, hookPoints: trainerHookPoints(config.trainer, index, count) })),
    share: config.trainer.share,
    widths: config.trainer.saes.map((s) => s.width),
    poolRows: config.buffer.capacityRows,
    dtypeBytes: DTYPE_BYTES[dtypeFromName(config.buffer.dtype)],
    tokensPerSae: config.trainer.steps * config.trainer.batchSize,
    producerLayers: 1 + Math.max(...config.producer.hookPoints.map(layerOf)),
  };
}
