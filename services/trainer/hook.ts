import { ConfigError, type RunConfig, type TrainerConfig } from "../common/config/index.js";
import { hookFolder } from "../common/sae-folders.js";
import { poolWidth, trainerHookPoints } from "../common/shards.js";

/**
 * The trainer's settings as one hook point's Training sees them: the sweep's, plus the hook point
 * and its pool's width (buffer.hookPoints is the one place widths are given).
 */
export type HookConfig = TrainerConfig & { hookPoint: string; dModel: number };

export function hookConfig(config: RunConfig, hookPoint: string): HookConfig {
  return { ...config.trainer, hookPoint, dModel: poolWidth(config.buffer, hookPoint) };
}

/** The hook points this trainer process trains (trainer.shardIndex of trainer.shardCount). */
export const processHookPoints = (config: RunConfig): string[] =>
  trainerHookPoints(config.trainer, config.trainer.shardIndex, config.trainer.shardCount);

/** Where a hook point's SAEs live (services/common/sae-folders.ts holds the rule). */
export function hookDir(config: RunConfig, hookPoint: string): string {
  return hookFolder(config.run.dir, config.trainer, hookPoint);
}

/** The config key of a hook point's pool width, under which a width mismatch is reported. */
export function widthKey(config: RunConfig, hookPoint: string): string {
  const i = config.buffer.hookPoints.findIndex((h) => h.name === hookPoint);
  return i < 0 ? "buffer.hookPoints" : `buffer.hookPoints.${i}.dModel`;
}

/** Refuses rows of another width than the hook point's pool, naming the pool's key. */
export function checkWidth(config: RunConfig, hookPoint: string, width: number, from: string): void {
  const dModel = poolWidth(config.buffer, hookPoint);
  if (width !== dModel) throw ConfigError.at(widthKey(config, hookPoint), `${dModel} for ${hookPoint}, but ${from} rows of width ${width}`);
}
