import type { RunConfig } from "../common/config/index.js";
import { doneAnnouncer, subjects } from "../common/coordination.js";
import { Serving } from "../common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../common/grpc/server.js";
import { type Bus, connectBus } from "../common/nats.js";
import { outcome, type Role, type RoleDeps, stderrLog } from "../common/role.js";
import { type StatusResponse, TrainerService } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import type { BatchSource } from "./batches.js";
import { checkDevice } from "./device.js";
import { hookConfig, processHookPoints } from "./hook.js";
import { trainerHandlers } from "./service.js";
import { bufferSource, streamsOf } from "./sources.js";
import { Training } from "./training.js";
import { Trainings } from "./trainings.js";

export interface TrainerDeps extends RoleDeps {
  /**
   * Batches to train on instead of the buffers' streams (tests, benches); no buffer is connected
   * then. One source serves a process training one hook point; a function gives each hook point its own.
   */
  source?: BatchSource | ((hookPoint: string) => BatchSource);
}

export interface RunningTrainer extends Role<StatusResponse> {
  /** Resolves true once every SAE's step graph is open and training runs; false if the run ended first. */
  readonly ready: Promise<boolean>;
}

/** Each hook point's batch source: the one handed in, or its buffer shards' streams. All are closed if one cannot be had. */
async function sourcesFor(config: RunConfig, hooks: string[], given: TrainerDeps["source"], log: (line: string) => void) {
  if (given && typeof given !== "function" && hooks.length > 1)
    throw new Error(`one batch source cannot feed ${hooks.length} hook points; pass a function of the hook point`);
  const made = await Promise.allSettled(
    hooks.map(async (h) => (given ? (typeof given === "function" ? given(h) : given) : bufferSource(config, h, log))),
  );
  const sources = made.flatMap((m) => (m.status === "fulfilled" ? [m.value] : []));
  const failed = made.find((m) => m.status === "rejected");
  if (failed) {
    for (const s of sources) s.close();
    throw failed.reason;
  }
  return sources;
}

/** The trainer's own NATS connection, used for nothing but announcing that it is done. */
const trainerBus = (config: RunConfig, log: (line: string) => void): Promise<Bus> =>
  connectBus({ url: config.nats.url, security: config.nats, name: `trainer-${config.trainer.id}`, log });

/**
 * Starts a trainer process: one Training per hook point it trains (trainer.hookPoints, its
 * shardIndex of shardCount), each fed by every buffer shard holding that hook point (unless handed a
 * source) after checking their pools; serves the control RPCs over all of them, and trains until
 * `steps`, the end of the streams, or a Stop RPC (checkpoint and export). `finished` settles once
 * every hook point's training is over. stop() checkpoints the step reached without exporting (the
 * next start resumes from it) and closes the server and the buffers' streams.
 */
export async function startTrainer(config: RunConfig, deps: TrainerDeps = {}): Promise<RunningTrainer> {
  const t = config.trainer;
  const log = deps.log ?? stderrLog;
  const hooks = processHookPoints(config);
  const device = await checkDevice(hooks.map((h) => hookConfig(config, h)));
  const sources = await sourcesFor(config, hooks, deps.source, log);
  let trainings: Trainings;
  let server: RunningServer;
  try {
    // Several hook points' lines interleave in one log: each says whose it is.
    const logOf = (h: string) => (hooks.length > 1 ? (line: string) => log(`${h}: ${line}`) : log);
    const all = hooks.map((hookPoint, i) => new Training({ config, hookPoint, source: sources[i]!, log: logOf(hookPoint) }));
    trainings = new Trainings(config, all);
    server = await startServer(deps.address ?? t.address, config.transport, [bind(TrainerService, trainerHandlers(trainings))]);
  } catch (err) {
    for (const s of sources) s.close();
    throw err;
  }
  const from = deps.source
    ? "in-memory batches"
    : [...new Set(hooks.flatMap((h) => streamsOf(config, h).map((s) => s.address)))].join(", ");
  log(
    `serving control RPCs on ${server.address}; training ${t.saes.length} SAE(s) on each of ${hooks.join(", ")} from ${from}, run folder ${config.run.dir}`,
  );
  log(device);
  // Trainers on the buffers' streams tell the run when they are done, so that it ends by itself.
  const done = deps.source
    ? undefined
    : doneAnnouncer(
        () => (deps.bus ? Promise.resolve(deps.bus) : trainerBus(config, log)),
        subjects(config.nats.subjectPrefix, config.run.id).trainerDone,
        log,
      );
  let stopping: Promise<void> | undefined;
  // Each hook point is announced as its training ends, so that its pools stop holding rows (and
  // their shard stop holding back the producers) for it while the process trains the others on.
  // Stopped by a signal, the trainer is to be started again and resume: its run is not over.
  const finished = outcome(
    trainings
      .run(async (training, result) => {
        if (!stopping) await done?.announce({ trainerId: t.id, hookPoints: [training.hookPoint], step: result.step });
      })
      .then(() => undefined),
  );
  const ready = Promise.race([trainings.ready.then(() => true), finished.then(() => false)]);
  void ready.then((up) => up && server.health.set(Serving.SERVING));

  const stop = () =>
    (stopping ??= (async () => {
      // After a finished run this settles at once; on a signal it checkpoints the step reached.
      await trainings.stop({ skipExport: true }).catch(() => undefined);
      await finished;
      server.health.set(Serving.NOT_SERVING);
      await server.close();
      if (!deps.bus) await done?.close();
    })());
  return { address: server.address, finished, ready, status: () => trainings.status(), stop };
}
