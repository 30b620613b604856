import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { getPriority, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, it } from "node:test";
import { readRunFile, type RunFile } from "../../tools/cli/run-file.js";
import { ReflectionClient } from "../support/reflection-client.js";

// What the README tells users to run against a live run: grpcurl list / describe / every control
// RPC of every role (through a reflection client, as grpcurl does it), `saeflow status` and
// `saeflow stop`.
const root = resolve(import.meta.dirname, "../..");
const run = promisify(execFile);
const cli = (...args: string[]) => run(process.execPath, ["--import", "tsx", "tools/cli/main.ts", ...args], { cwd: root });

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

describe("control plane of a live run", { timeout: 300_000 }, () => {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-control-"));
  let up: ChildProcess;
  let exited: Promise<number | null>;
  let output = "";
  let services: RunFile["services"] = [];
  const clients: ReflectionClient[] = [];
  const reflect = (role: string) => {
    const c = new ReflectionClient(services.find((s) => s.role === role)!.address);
    clients.push(c);
    return c;
  };

  before(async () => {
    const sets = [
      "run.id=control",
      `run.dir=${runDir}`,
      "launch.basePort=0",
      "launch.evaluate=false",
      "launch.report=false",
      "buffer.capacityRows=8192",
      "producer.batchContexts=8",
      "trainer.steps=100000",
      "trainer.batchSize=256",
      "trainer.checkpointEvery=0",
    ];
    up = spawn(
      process.execPath,
      ["--import", "tsx", "tools/cli/main.ts", "up", "deploy/configs/local.yaml", ...sets.flatMap((s) => ["--set", s])],
      { cwd: root, stdio: ["ignore", "pipe", "pipe"] },
    );
    up.stdout!.on("data", (d: Buffer) => (output += d.toString()));
    up.stderr!.on("data", (d: Buffer) => (output += d.toString()));
    exited = new Promise((r) => up.once("exit", (code) => r(code)));
    services = await until("run.json", async () => (existsSync(join(runDir, "run.json")) ? readRunFile(runDir).services : undefined));
    // Training has begun once the trainer reports a step.
    await until("the first step", async () => {
      const st = (await reflect("trainer").call("saeflow.trainer.v1.TrainerService", "Status", {})) as { saes?: Array<{ step?: string }> };
      return Number(st.saes?.[0]?.step ?? 0) > 0 ? true : undefined;
    });
  });
  after(async () => {
    for (const c of clients) c.close();
    if (up.exitCode === null) up.kill("SIGKILL");
  });

  it("lists and describes each role's service", async () => {
    for (const [role, service, methods] of [
      ["buffer", "saeflow.buffer.v1.BufferService", ["Push", "Batches", "Status", "Pause", "Resume", "Drain"]],
      ["producer", "saeflow.producer.v1.ProducerService", ["Status", "Pause", "Resume"]],
      ["trainer", "saeflow.trainer.v1.TrainerService", ["Status", "Checkpoint", "Pause", "Resume", "Stop"]],
    ] as const) {
      const c = reflect(role);
      assert.ok((await c.list()).includes(service));
      assert.deepEqual(
        (await c.describe(service)).methods.map((m) => m.name),
        methods,
      );
    }
  });

  it("runs the producer launch.producerNice (10) below the buffer and the trainer", () => {
    const base = getPriority();
    for (const s of services)
      assert.equal(getPriority(s.pid), s.role === "producer" ? Math.min(19, base + 10) : base, `${s.id}'s niceness`);
  });

  it("pauses and resumes the producer, the buffer and the trainer", async () => {
    for (const [role, service] of [
      ["producer", "saeflow.producer.v1.ProducerService"],
      ["buffer", "saeflow.buffer.v1.BufferService"],
      ["trainer", "saeflow.trainer.v1.TrainerService"],
    ] as const) {
      const c = reflect(role);
      assert.equal(((await c.call(service, "Pause", {})) as { state: string }).state, "SERVICE_STATE_PAUSED", role);
      assert.equal(((await c.call(service, "Resume", {})) as { state: string }).state, "SERVICE_STATE_RUNNING", role);
    }
  });

  it("checkpoints the trainer on request", async () => {
    const res = (await reflect("trainer").call("saeflow.trainer.v1.TrainerService", "Checkpoint", {})) as { paths: string[]; step: string };
    assert.equal(res.paths.length, 2);
    for (const p of res.paths) assert.ok(existsSync(p), p);
    assert.ok(Number(res.step) > 0);
  });

  it("prints one status table and stops the run with a checkpoint and an export", async () => {
    const { stdout } = await cli("status", runDir);
    for (const word of ["buffer blocks.1.hook_resid_post", "producer-0", "trainer-0", "topk-k8", "topk-k16"])
      assert.ok(stdout.includes(word), stdout);
    await cli("stop", runDir);
    const asked = performance.now();
    const code = await exited;
    assert.equal(code, 0, `a run stopped on request ends cleanly:\n${output}`);
    // Its roles end within seconds of the trainers; the CLI leaves with them rather than when the
    // 30 s it would give them to end by themselves has passed.
    const seconds = (performance.now() - asked) / 1000;
    assert.ok(seconds < 30, `saeflow up exited ${seconds.toFixed(1)} s after the run was asked to stop:\n${output}`);
    for (const sae of ["topk-k8", "topk-k16"])
      assert.ok(existsSync(join(runDir, sae, "sae_lens", "cfg.json")), `${sae} exported:\n${output}`);
    assert.ok(existsSync(join(runDir, "final-status.json")));
  });

  it("exports again from the checkpoints of the finished run", async () => {
    rmSync(join(runDir, "topk-k8", "sae_lens"), { recursive: true });
    const { stdout } = await cli("export", runDir);
    assert.deepEqual(stdout.trim().split("\n").sort(), [join(runDir, "topk-k16", "sae_lens"), join(runDir, "topk-k8", "sae_lens")]);
    assert.ok(existsSync(join(runDir, "topk-k8", "sae_lens", "sae_weights.safetensors")));
  });
});
