import { status as grpcStatus } from "@grpc/grpc-js";
import { FieldError } from "../common/errors.js";
import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { type StatusResponse, TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import type { Training } from "./training.js";

/** TrainerService over a training run: status, checkpoint now, pause, resume, stop. */
export function trainerHandlers(training: Training, status: () => StatusResponse): ServiceHandlers<typeof TrainerService> {
  return {
    status: async () => status(),
    checkpoint: async () => {
      if (!training.initialised) {
        throw new FieldError("trainer", "no SAE is initialised yet; nothing to checkpoint", grpcStatus.FAILED_PRECONDITION);
      }
      const { paths, step } = await training.checkpointNow();
      return { paths, step: BigInt(step) };
    },
    pause: async () => ({ state: training.pause() }),
    resume: async () => ({ state: training.resume() }),
    stop: async (req) => {
      const result = await training.stop({ skipExport: req.skipExport });
      return { checkpoints: result.checkpoints, exports: result.exports };
    },
  };
}
