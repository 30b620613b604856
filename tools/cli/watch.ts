import { resolve } from "node:path";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { drainBuffer, furthestStep } from "./control.js";
import { downNow, limit, liveServices, type LocalRun, log, stopTraining } from "./local-run.js";
import { ProgressLine, RecentWindow, summarise } from "./progress.js";
import { collectStatus } from "./status.js";
import { Watchdog } from "./watchdog.js";

/**
 * Shows progress until every trainer is done for good (finished, or failed past its restarts); true
 * when they all finished their work unasked. The line's throughput and wait are those of the last
 * seconds, it names what is down, and the watchdog says who waits for what when no step is taken.
 */
export async function watch(run: LocalRun): Promise<boolean> {
  const { config } = run.plan;
  const trainers = run.sup.of("trainer");
  let done = false;
  const trainersDone = Promise.all(trainers.map((t) => t.done)).then((codes) => {
    done = true;
    return codes;
  });
  drainWhenProducersFinish(run, () => done);
  const progress = new ProgressLine(resolve(run.plan.runDir, "pipeline.jsonl"));
  const recent = new RecentWindow();
  const watchdog = new Watchdog(config.launch.watchdogMs, config.buffer.mixFloor, log);
  try {
    while (!done) {
      const st = await collectStatus({ services: liveServices(run) }, run.plan.cli);
      // A trainer being restarted counts as waiting in the recent window, as a silent one does.
      for (const t of trainers) if (t.state === "restarting") st.trainers.push({ id: t.spec.id, error: "restarting" });
      const down = [
        ...downNow(run),
        // Roles still starting do not answer yet; one that served before and does not now is down.
        ...[...st.buffer, ...st.producers, ...st.trainers]
          .filter((x) => x.error && x.error !== "restarting" && run.sup.slots.find((s) => s.spec.id === x.id)?.served)
          .map((x) => `${x.id} (not answering)`),
      ];
      const record = summarise(st, run.startedAt, config.trainer.steps, { recent, down, lastStep: run.step });
      run.step = Math.max(run.step, furthestStep(st));
      progress.update(record);
      watchdog.check(st, record.stalledS ?? 0, down);
      await Promise.race([trainersDone, limit(config.launch.statusEveryMs)]);
    }
  } finally {
    progress.stop();
  }
  const codes = await trainersDone;
  return !run.stopping && codes.every((c) => c === 0);
}

/** Producers that finished their epochs let the buffer serve what it holds, then end the trainers' streams. */
function drainWhenProducersFinish(run: LocalRun, trainersDone: () => boolean): void {
  const producers = run.sup.of("producer");
  void Promise.all(producers.map((p) => p.done)).then(async (codes) => {
    if (run.stopping || run.sup.ending || trainersDone() || !codes.every((c) => c === 0)) return;
    // Producers also stop when the run ends (every trainer done): the buffers are then draining already.
    const st = await collectStatus({ services: liveServices(run).filter((s) => s.role === "buffer") }, run.plan.cli);
    const serving = st.buffer.filter((b) => b.status?.state === ServiceState.RUNNING || b.status?.state === ServiceState.PAUSED);
    if (!serving.length) return;
    log("every producer finished its epochs; the buffers serve what they hold, then end the trainers' streams");
    const addresses = new Map(run.plan.buffers.map((b) => [b.id, b.address]));
    await Promise.all(serving.map((b) => drainBuffer(addresses.get(b.id)!, run.plan.cli)));
  });
}

/** Ctrl-C: checkpoint the trainers and stop; a second Ctrl-C kills every process. */
export function interrupt(run: LocalRun): void {
  if (run.interrupted) {
    for (const s of run.sup.slots) s.proc.child.kill("SIGKILL");
    return;
  }
  run.interrupted = true;
  stopTraining(run, "interrupted: checkpointing the trainers, then stopping (Ctrl-C again to kill)");
}
