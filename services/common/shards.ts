import type { BufferConfig, TrainerConfig } from "./config/index.js";

/**
 * Where each pool lives in a run whose buffer is spread over several processes (buffer.shards). Every
 * role reads the same table from the one run config: the producer to push each hook point to its
 * shard, the trainer to read its hook points from every shard holding them, the CLI and the chart
 * to start one buffer per shard.
 */
export interface Shard {
  index: number;
  /** Where producers and trainers reach it. */
  address: string;
  hookPoints: string[];
}

/** The run's shards; with no buffer.shards, one at buffer.address holding every pool. */
export function shardsOf(buffer: BufferConfig): Shard[] {
  if (buffer.shards.length === 0) return [{ index: 0, address: buffer.address, hookPoints: buffer.hookPoints.map((h) => h.name) }];
  return buffer.shards.map((s, index) => ({ index, address: s.address, hookPoints: [...s.hookPoints] }));
}

/** The shard this buffer process is (buffer.shard). */
export function ownShard(buffer: BufferConfig): Shard {
  const shard = shardsOf(buffer)[buffer.shard];
  if (!shard) throw new Error(`buffer.shard ${buffer.shard} is not an entry of buffer.shards`);
  return shard;
}

/** Every shard holding a hook point's pool, in table order. */
export function shardsHolding(buffer: BufferConfig, hookPoint: string): Shard[] {
  return shardsOf(buffer).filter((s) => s.hookPoints.includes(hookPoint));
}

/**
 * The shard a producer pushes a hook point's rows to: producers are spread over the shards holding
 * it, so that each (shard, hook point) pool hears from a fixed set of producers and keeps its grants
 * and accounting per producer.
 */
export function shardFor(buffer: BufferConfig, hookPoint: string, producerIndex: number): Shard {
  const holding = shardsHolding(buffer, hookPoint);
  if (holding.length === 0) throw new Error(`no buffer shard holds the pool ${hookPoint}`);
  return holding[producerIndex % holding.length]!;
}

/** A pool's row width. */
export function poolWidth(buffer: BufferConfig, hookPoint: string): number {
  const pool = buffer.hookPoints.find((h) => h.name === hookPoint);
  if (!pool) throw new Error(`no pool in buffer.hookPoints for ${hookPoint}`);
  return pool.dModel;
}

/**
 * The hook points trainer process `index` of `count` trains: positions p with p % count == index, or,
 * with more trainers than hook points, hook point index % count (several trainers then train one
 * hook point's sweep side by side, as fan-out readers).
 */
export function trainerHookPoints(trainer: Pick<TrainerConfig, "hookPoints">, index: number, count: number): string[] {
  const all = trainer.hookPoints;
  if (count > all.length) return [all[index % all.length]!];
  return all.filter((_, p) => p % count === index);
}
