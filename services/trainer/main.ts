import { createClient } from "../common/grpc/adapter.js";
import { Serving } from "../common/grpc/health.js";
import { bind, startServer } from "../common/grpc/server.js";
import { serviceMain } from "../common/service-main.js";
import { BufferService } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import { checkBufferPool, GrpcBatchSource } from "./batches.js";
import { trainerHandlers } from "./service.js";
import { Trainer } from "./trainer.js";

/**
 * `tsx services/trainer/main.ts --config FILE [--set key=value ...]`: trains until `steps`, the end of
 * the buffer's stream or a Stop RPC (checkpoint and export), or SIGINT/SIGTERM (checkpoint only; the
 * next start resumes from it).
 */
await serviceMain(
  "trainer",
  async (config) => {
    const t = config.trainer;
    const buffer = createClient(BufferService, t.bufferAddress, config.transport);
    try {
      await buffer.ready(60_000);
      await checkBufferPool(buffer, config);
    } catch (err) {
      buffer.close();
      throw err;
    }
    const trainer = new Trainer({
      config,
      source: new GrpcBatchSource(buffer, config),
      log: (line) => process.stdout.write(`trainer: ${line}\n`),
    });
    const server = await startServer(t.address, config.transport, [bind(TrainerService, trainerHandlers(trainer, t.hookPoint))]);
    void trainer.ready.then(() => server.health.set(Serving.SERVING));
    const finished = trainer.run();
    return {
      banner: `serving control RPCs on ${server.address}; training ${t.saes.length} SAE(s) on ${t.hookPoint} from ${t.bufferAddress}, run folder ${config.run.dir}`,
      finished: finished.then(() => undefined),
      stop: async () => {
        // After a finished run this settles at once; on a signal it checkpoints the step reached.
        await trainer.stop({ skipExport: true }).catch(() => undefined);
        server.health.set(Serving.NOT_SERVING);
        await server.close();
        buffer.close();
      },
    };
  },
  (config) => ({ "saeflow.trainer_id": config.trainer.id }),
);
