import { mkdirSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { stringify } from "yaml";
import type { RunConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { freePort } from "./nats-server.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { makeTinyLlama } from "../model/tiny-llama.js";
import { natsForRun } from "./nats.js";
import { type RoleProcess, spawnRole, stopRole } from "./processes.js";
import { ProgressLine, summarise } from "./progress.js";
import { writeRunFile } from "./run-file.js";
import { collectStatus, statusJson } from "./status.js";

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
}

export const DEFAULT_TINY_MODEL = ".cache/tiny-llama/model.onnx";
const log = (line: string) => process.stderr.write(`saeflow: ${line}\n`);

async function waitServing(
  address: string,
  service: string,
  transport: RunConfig["transport"],
  exited: Promise<number>,
  timeoutMs: number,
): Promise<void> {
  const health = createClient(Health, address, transport);
  const until = Date.now() + timeoutMs;
  let dead = false;
  void exited.then(() => (dead = true));
  try {
    while (Date.now() < until && !dead) {
      try {
        if ((await health.check({ service }, { deadline: Date.now() + 1000 })).status === Serving.SERVING) return;
      } catch {
        // not listening yet
      }
      await new Promise((r) => setTimeout(r, 200));
    }
    throw new Error(dead ? `${service} exited during start-up` : `${service} at ${address} not serving after ${timeoutMs} ms`);
  } finally {
    health.close();
  }
}

async function ports(config: RunConfig, count: number): Promise<number[]> {
  if (config.launch.basePort) return Array.from({ length: count }, (_, i) => config.launch.basePort + i);
  return Promise.all(Array.from({ length: count }, () => freePort()));
}

export async function up(root: string, config: RunConfig): Promise<UpResult> {
  const runDir = resolve(root, config.run.dir);
  mkdirSync(runDir, { recursive: true });
  if (config.producer.model === DEFAULT_TINY_MODEL) {
    // Cheap when .cache holds this model already; regenerates one made from another seed or graph.
    const tiny = makeTinyLlama({ out: resolve(root, dirname(DEFAULT_TINY_MODEL)), seed: config.run.seed });
    if (tiny.generated) log(`generated the built-in tiny Llama model into ${DEFAULT_TINY_MODEL}`);
  }
  const nats = await natsForRun(root, process.env, log);
  const { launch } = config;
  const [bufferPort, ...rest] = await ports(config, 1 + launch.producers + launch.trainers);
  const bufferAddress = `127.0.0.1:${bufferPort}`;
  const resolved: RunConfig = {
    ...config,
    nats: { ...config.nats, url: nats.url },
    buffer: { ...config.buffer, address: bufferAddress },
    producer: { ...config.producer, bufferAddress, shardCount: launch.producers },
    trainer: { ...config.trainer, bufferAddress },
  };
  const configFile = resolve(runDir, "run.yaml");
  writeFileSync(configFile, `# Resolved by saeflow up; every process of the run read this file.\n${stringify(resolved)}`);

  const procs: RoleProcess[] = [];
  const exits: Record<string, number> = {};
  const stopAll = async () => {
    await settleAndSnapshot(runDir, procs, resolved);
    for (const role of ["producer", "trainer", "buffer"] as const) {
      if (role === "buffer") await drainBuffer(bufferAddress, resolved);
      await Promise.all(procs.filter((p) => p.role === role).map(async (p) => (exits[p.id] = await stopRole(p, 15_000))));
    }
    await nats.server?.stop();
  };

  let interrupted = false;
  let completed: boolean;
  const startedAt = Date.now();
  const progress = new ProgressLine(resolve(runDir, "pipeline.jsonl"));
  try {
    const buffer = spawnRole(root, runDir, "buffer", "buffer", bufferAddress, configFile, []);
    procs.push(buffer);
    await waitServing(bufferAddress, BufferService.typeName, resolved.transport, buffer.exited, 60_000);
    for (let i = 0; i < launch.producers; i++) {
      const address = `127.0.0.1:${rest[i]}`;
      procs.push(
        spawnRole(root, runDir, "producer", `producer-${i}`, address, configFile, [
          `producer.shardIndex=${i}`,
          `producer.address=${address}`,
          `producer.stateFile=${resolve(runDir, `producer-${i}.position.json`)}`,
        ]),
      );
    }
    const trainers: RoleProcess[] = [];
    for (let i = 0; i < launch.trainers; i++) {
      const address = `127.0.0.1:${rest[launch.producers + i]}`;
      // Several trainers train the same sweep names, so each gets its own folder.
      const own = launch.trainers > 1 ? [`run.dir=${resolve(runDir, `trainer-${i}`)}`] : [];
      const t = spawnRole(root, runDir, "trainer", `trainer-${i}`, address, configFile, [
        `trainer.id=trainer-${i}`,
        `trainer.address=${address}`,
        ...own,
      ]);
      trainers.push(t);
      procs.push(t);
    }
    writeRunFile(runDir, {
      runId: config.run.id,
      config: configFile,
      natsUrl: nats.url,
      startedAt: new Date(startedAt).toISOString(),
      services: procs.map((p) => ({ id: p.id, role: p.role, address: p.address, pid: p.child.pid ?? -1, log: p.log })),
    });
    log(
      `run ${config.run.id}: ${launch.producers} producer(s), buffer ${bufferAddress}, ${launch.trainers} trainer(s); logs in ${resolve(runDir, "logs")}`,
    );

    let stopping = false;
    const stopTraining = (why: string) => {
      if (stopping) return;
      stopping = true;
      log(why);
      void Promise.all(trainers.map((t) => stopTrainer(t.address, resolved)));
    };
    const onSignal = () => {
      if (interrupted) {
        for (const p of procs) p.child.kill("SIGKILL");
        return;
      }
      interrupted = true;
      stopTraining("interrupted: checkpointing the trainers, then stopping (Ctrl-C again to kill)");
    };
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);

    // A failed buffer or producer ends the run with a checkpoint rather than leaving trainers waiting;
    // producers that finished their epochs let the buffer drain what it holds to the trainers.
    for (const p of procs.filter((q) => q.role !== "trainer")) {
      void p.exited.then((code) => {
        if (code !== 0 && !stopping) stopTraining(`${p.id} exited with ${code} (see ${p.log}); checkpointing the trainers`);
      });
    }
    let done = false;
    const producers = procs.filter((p) => p.role === "producer");
    void Promise.all(producers.map((p) => p.exited)).then((codes) => {
      if (!stopping && !done && codes.every((c) => c === 0)) {
        log("every producer finished its epochs; the buffer serves what it holds, then ends the trainers' streams");
        void drainBuffer(bufferAddress, resolved);
      }
    });
    const trainersDone = Promise.all(trainers.map(async (t) => (exits[t.id] = await t.exited)));
    void trainersDone.then(() => (done = true));
    while (!done) {
      const st = await collectStatus({ services: procs.filter((p) => p.child.exitCode === null).map((p) => ({ ...p, pid: 0 })) });
      progress.update(summarise(st, startedAt, config.trainer.steps));
      await Promise.race([trainersDone, new Promise((r) => setTimeout(r, launch.statusEveryMs))]);
    }
    progress.stop();
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    completed = !stopping && trainers.every((t) => exits[t.id] === 0);
  } finally {
    progress.stop();
    await stopAll();
  }
  const trainerDirs = launch.trainers > 1 ? Array.from({ length: launch.trainers }, (_, i) => resolve(runDir, `trainer-${i}`)) : [runDir];
  return { runDir, trainerDirs, exits, completed };
}

/**
 * Pauses the producers, waits until no rows are moving, and writes final-status.json: every
 * service's last status at one quiet moment, so rows sent, accepted, served and trained reconcile.
 */
async function settleAndSnapshot(runDir: string, procs: RoleProcess[], config: RunConfig): Promise<void> {
  const live = () => procs.filter((p) => p.child.exitCode === null && p.child.signalCode === null).map((p) => ({ ...p, pid: 0 }));
  await Promise.all(
    live()
      .filter((p) => p.role === "producer")
      .map(async (p) => {
        const client = createClient(ProducerService, p.address, config.transport);
        await client.pause({}, { deadline: Date.now() + 5000 }).catch(() => undefined);
        client.close();
      }),
  );
  let last = "";
  const until = Date.now() + 15_000;
  for (;;) {
    const st = await collectStatus({ services: live() });
    const moving = JSON.stringify([
      st.producers.map((p) => String(p.status?.rowsSent ?? "")),
      st.buffer.map((b) => b.status?.hookPoints.map((h) => [String(h.rowsIn), String(h.rowsOut), h.dropped.map((d) => String(d.rows))])),
    ]);
    if (moving === last || Date.now() > until) {
      writeFileSync(resolve(runDir, "final-status.json"), `${JSON.stringify(statusJson(st), null, 2)}\n`);
      return;
    }
    last = moving;
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function drainBuffer(address: string, config: RunConfig): Promise<void> {
  const client = createClient(BufferService, address, config.transport);
  try {
    await client.drain({}, { deadline: Date.now() + 5000 });
  } catch {
    // Already gone; nothing to drain.
  } finally {
    client.close();
  }
}

export async function stopTrainer(address: string, config: RunConfig): Promise<void> {
  const client = createClient(TrainerService, address, config.transport);
  try {
    await client.stop({}, { deadline: Date.now() + 120_000 });
  } catch (err) {
    log(`trainer at ${address} did not stop cleanly: ${(err as Error).message}`);
  } finally {
    client.close();
  }
}
