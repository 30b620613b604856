import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import { ConfigError, loadConfig, type RunConfig } from "../../services/common/config/index.js";

type Tree = Record<string, unknown>;
const tree = (v: unknown): Tree => (typeof v === "object" && v !== null && !Array.isArray(v) ? (v as Tree) : {});

/**
 * The run config the chart renders from a values file (deploy/helm/saeflow/templates/_helpers.tpl,
 * saeflow.runConfig): `config`, with producer.shardCount and trainer.shardCount from the replicas,
 * buffer.trainers, and each shard at its Service's address (one shard holding every pool when
 * config.buffer.shards is empty). The chart's own defaults (one producer, one trainer) apply.
 */
export function configFromValues(path: string, sets: string[]): RunConfig {
  let values: Tree;
  try {
    values = tree(parseYaml(readFileSync(path, "utf8")));
  } catch (err) {
    throw ConfigError.at("--values", `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const config = structuredClone(tree(values.config));
  const replicas = (role: string) => Number(tree(values[role]).replicas ?? 1);
  const port = Number(tree(values.buffer).port ?? 50051);
  const buffer = tree(config.buffer);
  const given = Array.isArray(buffer.shards) && buffer.shards.length ? (buffer.shards as unknown[]).map(tree) : [{}];
  buffer.shards = given.map((s, i) => ({
    address: `saeflow-buffer-${i}:${port}`,
    hookPoints: s.hookPoints ?? (Array.isArray(buffer.hookPoints) ? buffer.hookPoints.map((h) => tree(h).name) : []),
  }));
  buffer.trainers = replicas("trainer");
  config.buffer = buffer;
  config.producer = { ...tree(config.producer), shardCount: replicas("producer") };
  config.trainer = { ...tree(config.trainer), shardCount: replicas("trainer") };
  return loadConfig({ base: config, sets });
}
