import { status as grpcStatus } from "@grpc/grpc-js";
import { FieldError } from "../common/errors.js";
import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import type { Trainings } from "./trainings.js";

/** TrainerService over a trainer process's Trainings (every hook point at once): status, checkpoint now, pause, resume, stop. */
export function trainerHandlers(trainings: Trainings): ServiceHandlers<typeof TrainerService> {
  return {
    status: async () => trainings.status(),
    checkpoint: async () => {
      if (!trainings.initialised) {
        throw new FieldError("trainer", "no SAE is initialised yet; nothing to checkpoint", grpcStatus.FAILED_PRECONDITION);
      }
      const { paths, step } = await trainings.checkpointNow();
      return { paths, step: BigInt(step) };
    },
    pause: async () => ({ state: await trainings.pause() }),
    resume: async () => ({ state: trainings.resume() }),
    stop: async (req) => {
      const result = await trainings.stop({ skipExport: req.skipExport });
      return { checkpoints: result.checkpoints, exports: result.exports };
    },
  };
}
