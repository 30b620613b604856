import type { RunConfig, TransportConfig } from "../../services/common/config/index.js";
import { furthestStep, stopTrainer } from "./control.js";
import type { LocalTls } from "./local-tls.js";
import type { NatsForRun } from "./nats.js";
import { collectStatus } from "./status.js";
import type { NatsWatch, Supervisor } from "./supervise.js";

export interface BufferShardProcess {
  id: string;
  shard: number;
  address: string;
  hookPoints: string[];
}

/** Where every process of the run listens, and the resolved config they all read. */
export interface RunPlan {
  root: string;
  runDir: string;
  configFile: string;
  config: RunConfig;
  /** How the CLI itself calls the roles: the run's transport, with the operator's certificate under TLS. */
  cli: TransportConfig;
  tls?: LocalTls;
  nats: NatsForRun;
  /** One buffer process per shard of the run (one when buffer.shards is empty). */
  buffers: BufferShardProcess[];
  producerAddresses: string[];
  trainerAddresses: string[];
}

/** A run under way: its supervised processes, and what the CLI has learnt of them. */
export interface LocalRun {
  plan: RunPlan;
  sup: Supervisor;
  /** The nats-server this run started, supervised; absent with NATS_URL. */
  nats?: NatsWatch;
  startedAt: number;
  /** The furthest step a trainer was seen at. */
  step: number;
  /** The trainers were asked to stop early (Ctrl-C, a failed role). */
  stopping: boolean;
  interrupted: boolean;
}

export const log = (line: string) => process.stderr.write(`saeflow: ${line}\n`);
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/**
 * A time limit raced against work that keeps the process alive by itself (child processes, calls):
 * it does not, so a CLI whose work ended before the limit exits then, not when the limit would pass.
 */
export const limit = (ms: number) => new Promise((r) => setTimeout(r, ms).unref());

/** The services of the run whose process is up now (not restarting, not ended), as collectStatus takes them. */
export const liveServices = (run: LocalRun) =>
  run.sup.slots
    .filter((s) => s.state === "running")
    .map((s) => ({ id: s.spec.id, role: s.spec.role, address: s.spec.address, pid: 0, log: s.proc.log }));

/** What is down now: roles being restarted and the nats-server this run started. */
export function downNow(run: LocalRun): string[] {
  const down = run.sup.slots.filter((s) => s.state === "restarting").map((s) => `${s.spec.id} (restarting)`);
  if (run.nats?.down) down.push("nats-server (restarting)");
  return down;
}

/** Asks every trainer to checkpoint, export and stop; those that cannot take the call get SIGTERM, which checkpoints too. */
export function stopTraining(run: LocalRun, why: string): void {
  if (run.stopping) return;
  run.stopping = true;
  // From here on the CLI takes the run down: a role that exits is not started again.
  run.sup.ending = true;
  log(why);
  const trainers = run.sup.of("trainer").filter((s) => s.state === "running");
  void (async () => {
    // The step they stop at tells whether the run trained at all.
    const st = await collectStatus({ services: liveServices(run).filter((s) => s.role === "trainer") }, run.plan.cli);
    run.step = Math.max(run.step, furthestStep(st));
    await Promise.all(
      trainers.map(async (t) => {
        if (!(await stopTrainer(t.spec.address, run.plan.cli))) t.proc.child.kill("SIGTERM");
      }),
    );
  })();
}
