import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { stringify } from "yaml";
import type { RunConfig, TransportConfig } from "../../services/common/config/index.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { makeTinyLlama } from "../model/tiny-llama.js";
import { drainBuffer, furthestStep, settleAndSnapshot, stopTrainer, waitServing } from "./control.js";
import { type LocalTls, makeLocalTls } from "./local-tls.js";
import { freePort } from "./nats-server.js";
import { type NatsForRun, natsForRun } from "./nats.js";
import { checkBeforeStart } from "./preflight.js";
import { exitReport, isRunning, type RoleProcess, spawnRole, stopRole } from "./processes.js";
import { ProgressLine, summarise } from "./progress.js";
import { writeRunFile } from "./run-file.js";
import { handlingSignals } from "./signals.js";
import { collectStatus } from "./status.js";

/**
 * `saeflow up`: one run on this machine. NATS, the buffer, N producers and M trainers as separate
 * processes on loopback, wired by one resolved config written into the run folder. Ends when the
 * trainers finish (or on Ctrl-C, which checkpoints first), then drains the rest.
 */
export interface UpResult {
  runDir: string;
  /** Where each trainer wrote its SAEs: runDir itself, or runDir/trainer-i with several trainers. */
  trainerDirs: string[];
  /** Exit code of each role process. */
  exits: Record<string, number>;
  /** True when the trainers finished their steps (not interrupted, none failed). */
  completed: boolean;
  /** True when some trainer got through a step: only then is there anything to evaluate or report. */
  trained: boolean;
}

export const DEFAULT_TINY_MODEL = ".cache/tiny-llama/model.onnx";
const log = (line: string) => process.stderr.write(`saeflow: ${line}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface UpOptions {
  /** Every gRPC call under mTLS with certificates from a CA made for this run, NATS over TLS with a token. */
  tls?: boolean;
}

/** Where every process of the run listens, and the resolved config they all read. */
interface RunPlan {
  root: string;
  runDir: string;
  configFile: string;
  config: RunConfig;
  /** How the CLI itself calls the roles: the run's transport, with the operator's certificate under TLS. */
  cli: TransportConfig;
  tls?: LocalTls;
  nats: NatsForRun;
  bufferAddress: string;
  producerAddresses: string[];
  trainerAddresses: string[];
}

/** A run under way: its processes as they start, and what the CLI has learnt of them. */
interface LocalRun {
  plan: RunPlan;
  procs: RoleProcess[];
  exits: Record<string, number>;
  startedAt: number;
  /** The furthest step a trainer was seen at. */
  step: number;
  /** The trainers were asked to stop early (Ctrl-C, a failed role). */
  stopping: boolean;
  interrupted: boolean;
  /** The CLI is taking the run down: exits from here on are its own doing. */
  ending: boolean;
}

export async function up(root: string, config: RunConfig, options: UpOptions = {}): Promise<UpResult> {
  const runDir = prepare(root, config);
  const tls = options.tls ? makeLocalTls(runDir) : undefined;
  const nats = await natsForRun(root, process.env, log, tls?.nats.configFile);
  const run = await planRun(root, runDir, config, nats, tls).catch(async (err: unknown) => {
    await nats.server?.stop();
    throw err;
  });
  let completed: boolean;
  try {
    completed = await handlingSignals(
      () => interrupt(run),
      async () => {
        await startRoles(run);
        announce(run);
        return watch(run);
      },
    );
  } finally {
    await takeDown(run);
  }
  const dirs =
    config.launch.trainers > 1 ? Array.from({ length: config.launch.trainers }, (_, i) => resolve(runDir, `trainer-${i}`)) : [runDir];
  return { runDir, trainerDirs: dirs, exits: run.exits, completed, trained: completed || run.step > 0 };
}

/** The model in place and every check that needs no process, before anything is written or started. */
function prepare(root: string, config: RunConfig): string {
  if (config.producer.model === DEFAULT_TINY_MODEL) {
    // Cheap when .cache holds this model already; regenerates one made from another seed or graph.
    const tiny = makeTinyLlama({ out: resolve(root, dirname(DEFAULT_TINY_MODEL)), seed: config.run.seed });
    if (tiny.generated) log(`generated the built-in tiny Llama model into ${DEFAULT_TINY_MODEL}`);
  }
  checkBeforeStart(root, config);
  const runDir = resolve(root, config.run.dir);
  mkdirSync(runDir, { recursive: true });
  return runDir;
}

async function ports(config: RunConfig, count: number): Promise<number[]> {
  if (config.launch.basePort) return Array.from({ length: count }, (_, i) => config.launch.basePort + i);
  return Promise.all(Array.from({ length: count }, () => freePort()));
}

/**
 * Under --tls, run.yaml names the CA and the name servers answer to; each process adds its own
 * certificate with --set, so run.yaml alone holds no identity. The NATS this run started wants TLS
 * and the token in <run>/tls/nats.token.
 */
function secured(config: RunConfig, nats: NatsForRun, tls: LocalTls | undefined): Pick<RunConfig, "transport" | "nats"> {
  if (!tls) return { transport: config.transport, nats: { ...config.nats, url: nats.url } };
  const transport = {
    ...config.transport,
    tls: { ...config.transport.tls, mode: "mtls" as const, ca: tls.ca, cert: "", key: "", serverName: tls.serverName },
  };
  if (!nats.server) return { transport, nats: { ...config.nats, url: nats.url } };
  const none = { user: "", password: "", passwordFile: "", token: "", credsFile: "", nkeyFile: "" };
  return {
    transport,
    nats: { ...config.nats, ...none, url: nats.url, tokenFile: tls.nats.tokenFile, tls: { ca: tls.ca, cert: "", key: "" } },
  };
}

/** Picks the ports and writes run.yaml: the config with the addresses filled in. */
async function planRun(root: string, runDir: string, config: RunConfig, nats: NatsForRun, tls: LocalTls | undefined): Promise<LocalRun> {
  const { producers, trainers } = config.launch;
  const addresses = (await ports(config, 1 + producers + trainers)).map((port) => `127.0.0.1:${port}`);
  const bufferAddress = addresses[0]!;
  const resolved: RunConfig = {
    ...config,
    ...secured(config, nats, tls),
    buffer: { ...config.buffer, address: bufferAddress },
    producer: { ...config.producer, bufferAddress, shardCount: producers },
    trainer: { ...config.trainer, bufferAddress },
  };
  const configFile = resolve(runDir, "run.yaml");
  writeFileSync(configFile, `# Resolved by saeflow up; every process of the run read this file.\n${stringify(resolved)}`);
  const plan: RunPlan = {
    root,
    runDir,
    configFile,
    config: resolved,
    cli: tls
      ? { ...resolved.transport, tls: { ...resolved.transport.tls, cert: tls.operator.cert, key: tls.operator.key } }
      : resolved.transport,
    ...(tls ? { tls } : {}),
    nats,
    bufferAddress,
    producerAddresses: addresses.slice(1, 1 + producers),
    trainerAddresses: addresses.slice(1 + producers),
  };
  return { plan, procs: [], exits: {}, startedAt: Date.now(), step: 0, stopping: false, interrupted: false, ending: false };
}

/** The buffer first (producers and trainers connect to it), then the producers and the trainers. */
async function startRoles(run: LocalRun): Promise<void> {
  const { plan } = run;
  const spawn = (role: RoleProcess["role"], id: string, address: string, sets: string[]) => {
    const own = plan.tls?.issue(id, role);
    const identity = own ? [`transport.tls.cert=${own.cert}`, `transport.tls.key=${own.key}`] : [];
    run.procs.push(spawnRole(plan.root, plan.runDir, role, id, address, plan.configFile, [...sets, ...identity]));
  };
  spawn("buffer", "buffer", plan.bufferAddress, []);
  await waitServing(run.procs[0]!, BufferService.typeName, plan.cli, 60_000);
  if (run.stopping) throw new Error("interrupted while the buffer started");
  plan.producerAddresses.forEach((address, i) =>
    spawn("producer", `producer-${i}`, address, [
      `producer.shardIndex=${i}`,
      `producer.address=${address}`,
      `producer.stateFile=${resolve(plan.runDir, `producer-${i}.position.json`)}`,
    ]),
  );
  plan.trainerAddresses.forEach((address, i) =>
    spawn("trainer", `trainer-${i}`, address, [
      `trainer.id=trainer-${i}`,
      `trainer.address=${address}`,
      // Several trainers train the same sweep names, so each gets its own folder.
      ...(plan.trainerAddresses.length > 1 ? [`run.dir=${resolve(plan.runDir, `trainer-${i}`)}`] : []),
    ]),
  );
}

/** run.json for `saeflow status/stop/export`, and one line saying what runs where. */
function announce(run: LocalRun): void {
  const { plan } = run;
  writeRunFile(plan.runDir, {
    runId: plan.config.run.id,
    config: plan.configFile,
    natsUrl: plan.nats.url,
    startedAt: new Date(run.startedAt).toISOString(),
    services: run.procs.map((p) => ({ id: p.id, role: p.role, address: p.address, pid: p.child.pid ?? -1, log: p.log })),
    ...(plan.tls
      ? { tls: { ca: plan.tls.ca, serverName: plan.tls.serverName, operator: plan.tls.operator, exporter: plan.tls.exporter } }
      : {}),
  });
  const { producers, trainers } = plan.config.launch;
  log(
    `run ${plan.config.run.id}: ${producers} producer(s), buffer ${plan.bufferAddress}, ${trainers} trainer(s); logs in ${resolve(plan.runDir, "logs")}`,
  );
  if (plan.tls) log(`mTLS on every gRPC call; the CA and the operator's certificate are in ${plan.tls.dir} (see run.json)`);
}

/** Shows progress until every trainer has exited; true when they all finished their work unasked. */
async function watch(run: LocalRun): Promise<boolean> {
  const trainers = run.procs.filter((p) => p.role === "trainer");
  let done = false;
  const trainersDone = Promise.all(trainers.map(async (t) => (run.exits[t.id] = await t.exited))).then(() => (done = true));
  watchFailures(run);
  drainWhenProducersFinish(run, () => done);
  const progress = new ProgressLine(resolve(run.plan.runDir, "pipeline.jsonl"));
  try {
    while (!done) {
      const st = await collectStatus({ services: run.procs.filter(isRunning).map((p) => ({ ...p, pid: 0 })) }, run.plan.cli);
      run.step = Math.max(run.step, furthestStep(st));
      progress.update(summarise(st, run.startedAt, run.plan.config.trainer.steps));
      await Promise.race([trainersDone, sleep(run.plan.config.launch.statusEveryMs)]);
    }
  } finally {
    progress.stop();
  }
  return !run.stopping && trainers.every((t) => run.exits[t.id] === 0);
}

/**
 * A role that fails says why, in its own words. A failed buffer or producer ends the run with a
 * checkpoint rather than leaving the trainers waiting.
 */
function watchFailures(run: LocalRun): void {
  for (const p of run.procs) {
    void p.exited.then((code) => {
      if (code === 0 || run.ending) return;
      log(exitReport(p, code));
      if (p.role !== "trainer") stopTraining(run, "checkpointing the trainers, then stopping the run");
    });
  }
}

/** Producers that finished their epochs let the buffer serve what it holds, then end the trainers' streams. */
function drainWhenProducersFinish(run: LocalRun, trainersDone: () => boolean): void {
  const producers = run.procs.filter((p) => p.role === "producer");
  void Promise.all(producers.map((p) => p.exited)).then((codes) => {
    if (run.stopping || run.ending || trainersDone() || !codes.every((c) => c === 0)) return;
    log("every producer finished its epochs; the buffer serves what it holds, then ends the trainers' streams");
    void drainBuffer(run.plan.bufferAddress, run.plan.cli);
  });
}

function stopTraining(run: LocalRun, why: string): void {
  if (run.stopping) return;
  run.stopping = true;
  log(why);
  const trainers = run.procs.filter((p) => p.role === "trainer" && isRunning(p));
  void (async () => {
    // The step they stop at tells whether the run trained at all.
    run.step = Math.max(run.step, furthestStep(await collectStatus({ services: trainers.map((t) => ({ ...t, pid: 0 })) }, run.plan.cli)));
    await Promise.all(
      trainers.map(async (t) => {
        // One not serving yet cannot take the call; its own SIGTERM handling checkpoints it the same way.
        if (!(await stopTrainer(t.address, run.plan.cli))) t.child.kill("SIGTERM");
      }),
    );
  })();
}

function interrupt(run: LocalRun): void {
  if (run.interrupted) {
    for (const p of run.procs) p.child.kill("SIGKILL");
    return;
  }
  run.interrupted = true;
  stopTraining(run, "interrupted: checkpointing the trainers, then stopping (Ctrl-C again to kill)");
}

/** Snapshots the final status, stops producers, trainers and the buffer in that order, then NATS. */
async function takeDown(run: LocalRun): Promise<void> {
  run.ending = true;
  const { plan } = run;
  try {
    run.step = Math.max(run.step, furthestStep(await settleAndSnapshot(plan.runDir, run.procs, plan.cli)));
  } catch (err) {
    log(`final-status.json not written: ${(err as Error).message}`);
  }
  for (const role of ["producer", "trainer", "buffer"] as const) {
    if (role === "buffer") await drainBuffer(plan.bufferAddress, plan.cli);
    await Promise.all(run.procs.filter((p) => p.role === role).map(async (p) => (run.exits[p.id] = await stopRole(p, 15_000))));
  }
  await plan.nats.server?.stop();
}
