import { create } from "@bufbuild/protobuf";
import type { RunConfig } from "../common/config/index.js";
import { doneAnnouncer, subjects } from "../common/coordination.js";
import { createClient } from "../common/grpc/adapter.js";
import { Serving } from "../common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../common/grpc/server.js";
import { type Bus, connectBus } from "../common/nats.js";
import { outcome, type Role, type RoleDeps, stderrLog } from "../common/role.js";
import { BufferService } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { type StatusResponse, StatusResponseSchema, TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import { type BatchSource, checkBufferPool } from "./batches.js";
import { checkDevice } from "./device.js";
import { placementOf, widenedByStream } from "./placement.js";
import { PrefetchedBatches } from "./prefetch.js";
import { trainerHandlers } from "./service.js";
import { Training } from "./training.js";

export interface TrainerDeps extends RoleDeps {
  /** Batches to train on instead of the buffer's stream (tests, benches); no buffer is connected then. */
  source?: BatchSource;
}

export interface RunningTrainer extends Role<StatusResponse> {
  /** Resolves true once every SAE's step graph is open and training runs; false if the run ended first. */
  readonly ready: Promise<boolean>;
}

/** The Status RPC's answer for `training`. */
function statusOf(training: Training, hookPoint: string): StatusResponse {
  const report = training.report();
  return create(StatusResponseSchema, {
    state: training.state,
    hookPoint,
    runDir: training.runDir,
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
  });
}

/**
 * The buffer's Batches stream, once the buffer answers and serves the configured pool, received on
 * its own thread so that batches arrive while steps run (prefetch.ts).
 */
async function bufferSource(config: RunConfig, log: (line: string) => void): Promise<BatchSource> {
  const client = createClient(BufferService, config.trainer.bufferAddress, config.transport);
  try {
    await client.ready(60_000);
    await checkBufferPool(client, config);
  } finally {
    client.close();
  }
  const t = config.trainer;
  return new PrefetchedBatches(config, widenedByStream(placementOf(t), t.dModel), 1, log);
}

/** The trainer's own NATS connection, used for nothing but announcing that it is done. */
const trainerBus = (config: RunConfig, log: (line: string) => void): Promise<Bus> =>
  connectBus({ url: config.nats.url, security: config.nats, name: `trainer-${config.trainer.id}`, log });

/**
 * Starts a trainer: connects the buffer (unless handed a source) and checks its pool, serves the
 * control RPCs, and trains until `steps`, the end of the stream, or a Stop RPC (checkpoint and
 * export). `finished` settles once training is over. stop() checkpoints the step reached without
 * exporting (the next start resumes from it) and closes the server and the buffer's stream.
 */
export async function startTrainer(config: RunConfig, deps: TrainerDeps = {}): Promise<RunningTrainer> {
  const t = config.trainer;
  const log = deps.log ?? stderrLog;
  const device = await checkDevice(t);
  const source = deps.source ?? (await bufferSource(config, log));
  let training: Training;
  let server: RunningServer;
  const status = () => statusOf(training, t.hookPoint);
  try {
    training = new Training({ config, source, log });
    server = await startServer(deps.address ?? t.address, config.transport, [bind(TrainerService, trainerHandlers(training, status))]);
  } catch (err) {
    source.close();
    throw err;
  }
  const from = deps.source ? "in-memory batches" : t.bufferAddress;
  log(
    `serving control RPCs on ${server.address}; training ${t.saes.length} SAE(s) on ${t.hookPoint} from ${from}, run folder ${config.run.dir}`,
  );
  log(device);
  // Trainers on the buffer's stream tell the run when they are done, so that it ends by itself.
  const done = deps.source
    ? undefined
    : doneAnnouncer(
        () => (deps.bus ? Promise.resolve(deps.bus) : trainerBus(config, log)),
        subjects(config.nats.subjectPrefix, config.run.id).trainerDone,
        log,
      );
  let stopping: Promise<void> | undefined;
  const finished = outcome(
    training.run().then(async (result) => {
      // Stopped by a signal, the trainer is to be started again and resume: the run is not over.
      if (!stopping) await done?.announce({ trainerId: t.id, hookPoint: t.hookPoint, step: result.step });
    }),
  );
  const ready = Promise.race([training.ready.then(() => true), finished.then(() => false)]);
  void ready.then((up) => up && server.health.set(Serving.SERVING));

  const stop = () =>
    (stopping ??= (async () => {
      // After a finished run this settles at once; on a signal it checkpoints the step reached.
      await training.stop({ skipExport: true }).catch(() => undefined);
      await finished;
      server.health.set(Serving.NOT_SERVING);
      await server.close();
      if (!deps.bus) await done?.close();
    })());
  return { address: server.address, finished, ready, status, stop };
}
