import { status } from "@grpc/grpc-js";
import { FieldError } from "../common/errors.js";
import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import type { Trainer } from "./trainer.js";

/** TrainerService over a Trainer: status, checkpoint now, pause, resume, stop. */
export function trainerHandlers(trainer: Trainer, hookPoint: string): ServiceHandlers<typeof TrainerService> {
  return {
    status: async () => {
      const report = trainer.report();
      return {
        state: trainer.state,
        hookPoint,
        runDir: trainer.runDir,
        waitMs: report.waitMs,
        wallMs: report.wallMs,
        saes: report.saes.map((s) => ({
          name: s.name,
          recipe: s.recipe,
          step: BigInt(s.step),
          tokens: BigInt(s.tokens),
          mse: s.latest?.mse ?? 0,
          explainedVariance: s.latest?.explained_variance ?? 0,
          l0: s.latest?.l0 ?? 0,
          deadFraction: s.deadFraction,
          tokensPerSecond: s.latest?.tokens_per_second ?? 0,
          loss: s.latest?.loss ?? 0,
          learningRate: s.learningRate,
        })),
      };
    },
    checkpoint: async () => {
      if (!trainer.initialised)
        throw new FieldError("trainer", "no SAE is initialised yet; nothing to checkpoint", status.FAILED_PRECONDITION);
      const { paths, step } = await trainer.checkpointNow();
      return { paths, step: BigInt(step) };
    },
    pause: async () => ({ state: trainer.pause() }),
    resume: async () => ({ state: trainer.resume() }),
    stop: async (req) => {
      const result = await trainer.stop({ skipExport: req.skipExport });
      return { checkpoints: result.checkpoints, exports: result.exports };
    },
  };
}
