import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, test } from "node:test";
import { checkpointSteps } from "../../services/trainer/checkpoint.js";
import { readJsonl } from "./fixtures.js";
import { webgpuEnv } from "./webgpu.js";

// `saeflow up` of the local preset at toy size with trainer.executionProvider=webgpu: nats-server,
// buffer, producer and trainer as real processes, the trainer's step on WebGPU over SwiftShader.
const root = resolve(import.meta.dirname, "../..");
const dir = mkdtempSync(join(tmpdir(), "saeflow-up-webgpu-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const STEPS = 20;

test("saeflow up trains with trainer.executionProvider=webgpu and completes", { timeout: 300_000 }, async () => {
  const runDir = join(dir, "run");
  const sets = [
    `run.dir=${runDir}`,
    "launch.basePort=0",
    "launch.evalContexts=2",
    "buffer.capacityRows=8192",
    "producer.batchContexts=8",
    `trainer.steps=${STEPS}`,
    "trainer.batchSize=256",
    "trainer.lrWarmupSteps=5",
    "trainer.logEvery=5",
    "trainer.checkpointEvery=10",
    "trainer.executionProvider=webgpu",
    "trainer.saes=[{name: topk-k4, recipe: topk, width: 128, k: 4, lr: 0.004}]",
  ];
  const child = spawn(
    process.execPath,
    ["--import", "tsx", "tools/cli/main.ts", "up", "deploy/configs/local.yaml", ...sets.flatMap((s) => ["--set", s])],
    {
      cwd: root,
      env: { ...process.env, ...webgpuEnv() },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  const code = await new Promise<number | null>((r) => child.once("exit", r));
  assert.equal(code, 0, output);
  const log = readFileSync(join(runDir, "logs", "trainer-0.log"), "utf8");
  assert.match(log, /trainer: webgpu: the sweep's state is [0-9.]+ KiB/);
  assert.equal(readJsonl(join(runDir, "topk-k4", "metrics.jsonl")).at(-1)!.step, STEPS);
  assert.deepEqual(checkpointSteps(join(runDir, "topk-k4", "checkpoints")), [10, 20]);
  assert.ok(existsSync(join(runDir, "topk-k4", "sae_lens", "sae_weights.safetensors")), output);
});
