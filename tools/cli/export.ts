import { resolve } from "node:path";
import type { RunConfig } from "../../services/common/config/index.js";
import { RECIPES } from "../../services/common/config/recipes.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ArrayBatchSource, type BatchSource, GrpcBatchSource } from "../../services/trainer/batches.js";
import { Training } from "../../services/trainer/training.js";

/**
 * `saeflow export RUN_DIR`: the SAELens export of every SAE from its newest checkpoint, for a run
 * that is over or still going. Only a recipe calibrated at export (JumpReLU) needs batches; they
 * come from the run's buffer when it still answers.
 */
export async function exportRun(config: RunConfig, trainerDirs: string[], log: (line: string) => void): Promise<string[]> {
  const needsBatches = config.trainer.saes.some((s) => RECIPES[s.recipe].calibrates);
  const out: string[] = [];
  for (const dir of trainerDirs) {
    const client = needsBatches ? createClient(BufferService, config.buffer.address, config.transport) : undefined;
    const reachable = client
      ? await client.ready(2000).then(
          () => true,
          () => false,
        )
      : false;
    if (needsBatches && !reachable)
      log(`the run's buffer at ${config.buffer.address} does not answer: a JumpReLU SAE cannot be calibrated without it`);
    const source: BatchSource =
      client && reachable
        ? new GrpcBatchSource(client, { ...config, trainer: { ...config.trainer, id: "saeflow-export", group: "saeflow-export" } })
        : new ArrayBatchSource([]);
    try {
      const training = new Training({ config: { ...config, run: { ...config.run, dir: resolve(dir) } }, source, log });
      out.push(...(await training.exportCheckpoints()));
    } finally {
      source.close();
      client?.close();
    }
  }
  return out;
}
