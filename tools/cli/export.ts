import { existsSync } from "node:fs";
import { resolve } from "node:path";
import type { RunConfig } from "../../services/common/config/index.js";
import { RECIPES } from "../../services/common/config/recipes.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { hookFolder } from "../../services/common/sae-folders.js";
import { shardsHolding } from "../../services/common/shards.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ArrayBatchSource, type BatchSource, GrpcBatchSource } from "../../services/trainer/batches.js";
import { Training } from "../../services/trainer/training.js";

/**
 * `saeflow export RUN_DIR`: the SAELens export of every SAE of every hook point from its newest
 * checkpoint, for a run that is over or still going. Only a recipe calibrated at export (JumpReLU)
 * needs batches; they come from a buffer shard holding the hook point, when it still answers.
 */
export async function exportRun(config: RunConfig, trainerDirs: string[], log: (line: string) => void): Promise<string[]> {
  const out: string[] = [];
  for (const dir of trainerDirs) {
    const at = { ...config, run: { ...config.run, dir: resolve(dir) } };
    // A trainer's own folder holds only the hook points it trained.
    const hooks = config.trainer.hookPoints.filter((hook) => existsSync(hookFolder(at.run.dir, config.trainer, hook)));
    for (const hookPoint of hooks) out.push(...(await exportHookPoint(at, hookPoint, log)));
  }
  return out;
}

async function exportHookPoint(config: RunConfig, hookPoint: string, log: (line: string) => void): Promise<string[]> {
  const needsBatches = config.trainer.saes.some((s) => RECIPES[s.recipe].calibrates);
  const address = shardsHolding(config.buffer, hookPoint)[0]!.address;
  const client = needsBatches ? createClient(BufferService, address, config.transport) : undefined;
  const reachable = client
    ? await client.ready(2000).then(
        () => true,
        () => false,
      )
    : false;
  if (needsBatches && !reachable)
    log(`the buffer at ${address} does not answer: a JumpReLU SAE of ${hookPoint} cannot be calibrated without it`);
  const exporter = { ...config, trainer: { ...config.trainer, id: "saeflow-export", group: "saeflow-export" } };
  const source: BatchSource =
    client && reachable ? new GrpcBatchSource(client, exporter, 2, { hookPoint, address }) : new ArrayBatchSource([]);
  try {
    return await new Training({ config, hookPoint, source, log }).exportCheckpoints();
  } finally {
    source.close();
    client?.close();
  }
}
