import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { stringify } from "yaml";
import type { RunConfig } from "../../services/common/config/index.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { makeTinyLlama } from "../model/tiny-llama.js";
import { waitServing } from "./control.js";
import { type LocalRun, log, type RunPlan, stopTraining } from "./local-run.js";
import { type LocalTls, makeLocalTls } from "./local-tls.js";
import { freePort } from "./nats-server.js";
import { type NatsForRun, natsForRun } from "./nats.js";
import { checkBeforeStart } from "./preflight.js";
import { spawnRole } from "./processes.js";
import { shardsOf } from "../../services/common/shards.js";
import { writeRunFile } from "./run-file.js";
import { handlingSignals } from "./signals.js";
import { NatsWatch, type RoleSpec, Supervisor } from "./supervise.js";
import { takeDown } from "./take-down.js";
import { interrupt, watch } from "./watch.js";

/**
 * `saeflow up`: one run on this machine. NATS, the buffer, N producers and M trainers as separate
 * processes on loopback, wired by one resolved config written into the run folder, each supervised
 * (supervise.ts: restarted after a crash, within launch.restarts). Ends when the trainers finish: they
 * announce it over NATS and the rest of the run ends by itself (or on Ctrl-C, which checkpoints first).
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

export interface UpOptions {
  /** Every gRPC call under mTLS with certificates from a CA made for this run, NATS over TLS with a token. */
  tls?: boolean;
}

export async function up(root: string, config: RunConfig, options: UpOptions = {}): Promise<UpResult> {
  const runDir = prepare(root, config);
  const tls = options.tls ? makeLocalTls(runDir) : undefined;
  const nats = await natsForRun(root, process.env, log, tls?.nats.configFile);
  const run = await planRun(root, runDir, config, nats, tls).catch(async (err: unknown) => {
    await nats.server?.stop();
    throw err;
  });
  let completed = false;
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
    await takeDown(run, completed);
  }
  const exits: Record<string, number> = {};
  for (const s of run.sup.slots) exits[s.spec.id] = await s.done;
  return { runDir, trainerDirs: trainerDirs(runDir, config), exits, completed, trained: completed || run.step > 0 };
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

/**
 * Picks the ports and writes run.yaml: the config with the addresses filled in. A run of several
 * buffer shards gets them all in buffer.shards; each buffer process is told which one it is.
 */
async function planRun(root: string, runDir: string, config: RunConfig, nats: NatsForRun, tls: LocalTls | undefined): Promise<LocalRun> {
  const { producers, trainers } = config.launch;
  const table = shardsOf(config.buffer);
  const addresses = (await ports(config, table.length + producers + trainers)).map((port) => `127.0.0.1:${port}`);
  const sharded = config.buffer.shards.length > 0;
  const buffers = table.map((shard) => ({
    id: sharded ? `buffer-${shard.index}` : "buffer",
    shard: shard.index,
    address: addresses[shard.index]!,
    hookPoints: shard.hookPoints,
  }));
  const resolved: RunConfig = {
    ...config,
    ...secured(config, nats, tls),
    // The buffer ends the run once its trainers are done, and keeps its ledger across a restart.
    buffer: {
      ...config.buffer,
      address: buffers[0]!.address,
      shards: sharded ? buffers.map((b) => ({ address: b.address, hookPoints: b.hookPoints })) : [],
      trainers,
      stateFile: config.buffer.stateFile || resolve(runDir, "buffer.state.json"),
    },
    producer: { ...config.producer, shardCount: producers },
    trainer: { ...config.trainer, shardCount: trainers },
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
    buffers,
    producerAddresses: addresses.slice(table.length, table.length + producers),
    trainerAddresses: addresses.slice(table.length + producers),
  };
  // Statuses left by an earlier run in this folder are not this run's last words.
  rmSync(resolve(runDir, "status"), { recursive: true, force: true });
  const sup = new Supervisor({
    runDir,
    budget: config.launch.restarts,
    cli: plan.cli,
    spawn: (spec) => spawnSpec(plan, spec),
    log,
    onFailure: (slot) => stopTraining(run, `${slot.spec.id} failed for good: checkpointing the trainers, then stopping the run`),
    onRestart: () => writeRun(run),
  });
  const run: LocalRun = { plan, sup, startedAt: Date.now(), step: 0, stopping: false, interrupted: false };
  if (nats.server) {
    const server = nats.server;
    run.nats = new NatsWatch(
      { ...nats, server },
      sup,
      config.launch.restarts,
      log,
      () => stopTraining(run, "nats-server failed for good: checkpointing the trainers, then stopping the run"),
      () => writeRun(run),
    );
  }
  return run;
}

/** A role's process, with its own certificate under TLS. */
function spawnSpec(plan: RunPlan, spec: RoleSpec) {
  const own = plan.tls?.issue(spec.id, spec.role);
  const identity = own ? [`transport.tls.cert=${own.cert}`, `transport.tls.key=${own.key}`] : [];
  const nice = spec.role === "producer" ? plan.config.launch.producerNice : 0;
  return spawnRole(plan.root, plan.runDir, spec.role, spec.id, spec.address, plan.configFile, [...spec.sets, ...identity], nice);
}

/** The buffers first (producers and trainers connect to them), then the producers and the trainers. */
async function startRoles(run: LocalRun): Promise<void> {
  const { plan, sup } = run;
  const sharded = plan.config.buffer.shards.length > 0;
  const buffers = plan.buffers.map((b) =>
    sup.start({
      role: "buffer",
      id: b.id,
      address: b.address,
      sets: sharded
        ? [`buffer.shard=${b.shard}`, `buffer.address=${b.address}`, `buffer.stateFile=${resolve(plan.runDir, `${b.id}.state.json`)}`]
        : [],
    }),
  );
  await Promise.all(buffers.map((b) => waitServing(b.proc, BufferService.typeName, plan.cli, 60_000)));
  if (run.stopping) throw new Error("interrupted while the buffers started");
  plan.producerAddresses.forEach((address, i) =>
    sup.start({
      role: "producer",
      id: `producer-${i}`,
      address,
      sets: [
        `producer.shardIndex=${i}`,
        `producer.address=${address}`,
        `producer.stateFile=${resolve(plan.runDir, `producer-${i}.position.json`)}`,
      ],
    }),
  );
  plan.trainerAddresses.forEach((address, i) =>
    sup.start({
      role: "trainer",
      id: `trainer-${i}`,
      address,
      sets: [
        `trainer.id=trainer-${i}`,
        `trainer.address=${address}`,
        `trainer.shardIndex=${i}`,
        ...(ownFolders(plan.config) ? [`run.dir=${resolve(plan.runDir, `trainer-${i}`)}`] : []),
      ],
    }),
  );
}

/** More trainers than hook points train the same sweep of one hook point side by side: each then gets its own folder. */
const ownFolders = (config: RunConfig) => config.launch.trainers > config.trainer.hookPoints.length;

/** The folders a run's trainers write their SAEs into: the run folder, or trainer-<i> each (see ownFolders). */
export function trainerDirs(runDir: string, config: RunConfig): string[] {
  return ownFolders(config) ? Array.from({ length: config.launch.trainers }, (_, i) => resolve(runDir, `trainer-${i}`)) : [runDir];
}

/** run.json for `saeflow status/stop/export`, and one line saying what runs where. */
function announce(run: LocalRun): void {
  const { plan } = run;
  writeRun(run);
  const { producers, trainers } = plan.config.launch;
  log(
    `run ${plan.config.run.id}: ${producers} producer(s), buffer ${plan.buffers.map((b) => b.address).join(", ")}, ${trainers} trainer(s); logs in ${resolve(plan.runDir, "logs")}`,
  );
  if (plan.tls) log(`mTLS on every gRPC call; the CA and the operator's certificate are in ${plan.tls.dir} (see run.json)`);
}

/** run.json as the run stands: written at start and again whenever a process was started again (its pid changed). */
function writeRun(run: LocalRun): void {
  const { plan } = run;
  writeRunFile(plan.runDir, {
    runId: plan.config.run.id,
    config: plan.configFile,
    natsUrl: plan.nats.url,
    startedAt: new Date(run.startedAt).toISOString(),
    services: run.sup.slots.map(({ proc: p }) => ({ id: p.id, role: p.role, address: p.address, pid: p.child.pid ?? -1, log: p.log })),
    buffers: plan.buffers,
    ...(run.nats ? { natsPid: run.nats.pid } : {}),
    ...(plan.tls
      ? { tls: { ca: plan.tls.ca, serverName: plan.tls.serverName, operator: plan.tls.operator, exporter: plan.tls.exporter } }
      : {}),
  });
}
