import type { RunConfig } from "../../services/common/config/index.js";
import { DTYPE_BYTES, dtypeFromName } from "../../services/common/tensor-codec.js";
import type { Layout } from "./model.js";

/**
 * The run a config describes, as the plan counts it: every pool of the buffer, on the shard that owns
 * it (round-robin over `shards` when the config leaves it open), with the trainer's sweep on every
 * hook point the trainers train, one stream per hook point (a sweep packed into one trainer process).
 */
export function layoutOf(config: RunConfig, shards: number): Layout {
  const trained = new Set([config.trainer.hookPoint]);
  const widths = config.trainer.saes.map((s) => s.width);
  return {
    hooks: config.buffer.hookPoints.map((h, i) => ({
      name: h.name,
      dModel: h.dModel,
      shard: i % shards,
      widths: trained.has(h.name) ? widths : [],
      streams: trained.has(h.name) ? 1 : 0,
    })),
    shards,
    poolRows: config.buffer.capacityRows,
    dtypeBytes: DTYPE_BYTES[dtypeFromName(config.buffer.dtype)],
    tokensPerSae: config.trainer.steps * config.trainer.batchSize,
  };
}
