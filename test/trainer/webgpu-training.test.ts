import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { fp32ToBf16 } from "../../services/common/tensor-codec.js";
import { ArrayBatchSource, type Batch } from "../../services/trainer/batches.js";
import { type Checkpoint, checkpointPath, checkpointSteps, loadCheckpoint } from "../../services/trainer/checkpoint.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { stateOf, type StepRecipe } from "../../services/trainer/graph/step.js";
import { stateTensor } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { startTrainer } from "../../services/trainer/trainer.js";
import { Training } from "../../services/trainer/training.js";
import { asBatches, smallSpec, sparseData, testConfig } from "./fixtures.js";
import { useSwiftShader, WEBGPU } from "./webgpu.js";

// Training runs with trainer.executionProvider=webgpu on SwiftShader: checkpoints, resume on the
// device and across providers, every recipe of a sweep with its schedule, export with JumpReLU's
// calibration, and the start-time refusal of a device too small. Adam's eps is 1e-4 where two
// providers are compared (see webgpu-step.test.ts).
useSwiftShader();
const root = mkdtempSync(join(tmpdir(), "saeflow-webgpu-"));
after(() => rmSync(root, { recursive: true, force: true }));
let runs = 0;
const runDir = () => join(root, `run-${runs++}`);

const D = 16;
const ROWS = 64;
const data = sparseData({ d: D, features: 24, active: 3, rows: ROWS, batches: 40, seed: "webgpu" });
const fp32 = asBatches(data.batches, ROWS, D);
const bf16: Batch[] = fp32.map((b) => ({ ...b, dtype: "bf16", data: Uint16Array.from(b.data as Float32Array, fp32ToBf16) }));

async function train(dir: string, trainer: Record<string, unknown>, source: Batch[]) {
  const config = testConfig(dir, { batchSize: ROWS, lrWarmupSteps: 2, adam: { eps: 1e-4 }, ...trainer }, { dModel: D });
  return new Training({ config, source: new ArrayBatchSource(source) }).run();
}

const checkpoint = (dir: string, sae: string, recipe: StepRecipe, width: number, step: number): Checkpoint =>
  loadCheckpoint(checkpointPath(join(dir, sae, "checkpoints"), step), recipe, width, D);

/** Every state tensor of `sae` in two runs agrees: bit for bit (tol 0), or within tol of its largest value. */
function compareStates(a: Checkpoint, b: Checkpoint, recipe: StepRecipe, tol: number, what: string): void {
  for (const s of stateOf(recipe)) {
    const [x, y] = [stateTensor(a.state, s), stateTensor(b.state, s)];
    if (tol === 0) {
      assert.ok(
        Buffer.from(x.buffer, x.byteOffset, x.byteLength).equals(Buffer.from(y.buffer, y.byteOffset, y.byteLength)),
        `${what}: ${s} differs`,
      );
      continue;
    }
    const scale = x.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-3);
    x.forEach((v, i) => assert.ok(Math.abs(v - y[i]!) <= tol * scale, `${what}: ${s}[${i}] ${v} vs ${y[i]} (scale ${scale})`));
  }
}

/** Trains `settings` to `steps` in one go, and in two parts with the second resuming from the first's checkpoint at `cut`. */
async function wholeAndResumed(settings: Record<string, unknown>, steps: number, cut: number, providers: [string, string]) {
  const whole = runDir();
  await train(whole, { ...settings, executionProvider: providers[0] }, fp32.slice(0, steps));
  const split = runDir();
  await train(split, { ...settings, executionProvider: providers[0] }, fp32.slice(0, cut));
  await train(split, { ...settings, executionProvider: providers[1] }, fp32.slice(cut, steps));
  return { whole, split };
}

describe("training on WebGPU (SwiftShader)", { timeout: 600_000 }, () => {
  test("ReLU, Gated and a trained JumpReLU resume from a device checkpoint bit-identical to an uninterrupted device run", async () => {
    const saes = [
      { name: "relu", recipe: "relu", width: 48, lr: 0.01, l1Coefficient: 0.5 },
      { name: "gated", recipe: "gated", width: 48, lr: 0.01, l1Coefficient: 0.5 },
      {
        name: "jrt",
        recipe: "jumprelu_trained",
        width: 48,
        lr: 0.01,
        l0WarmupSteps: 4,
        jumpreluBandwidth: 0.5,
        preActLossCoefficient: 1e-3,
      },
    ];
    const settings = { steps: 16, checkpointEvery: 8, deadWindowTokens: 2 * ROWS, saes };
    const { whole, split } = await wholeAndResumed(settings, 16, 8, ["webgpu", "webgpu"]);
    for (const [sae, recipe] of [
      ["relu", "relu"],
      ["gated", "gated"],
      ["jrt", "jumprelu_trained"],
    ] as const) {
      assert.deepEqual(checkpointSteps(join(split, sae, "checkpoints")), [8, 16]);
      compareStates(checkpoint(whole, sae, recipe, 48, 16), checkpoint(split, sae, recipe, 48, 16), recipe, 0, sae);
    }
  });

  test("the sparse codes resume from a device checkpoint to within float rounding (WebGPU adds their scatters in no fixed order)", async () => {
    const saes = [
      { name: "topk", recipe: "topk", width: 48, k: 3, kStart: 12, lr: 0.01, kAux: 4 },
      { name: "btk", recipe: "batchtopk", width: 48, k: 3, lr: 0.01 },
      { name: "mat", recipe: "matryoshka", width: 48, k: 3, prefixes: [8, 24], lr: 0.01 },
    ];
    const settings = { steps: 16, checkpointEvery: 8, kAnnealFraction: 0.5, deadWindowTokens: 4 * ROWS, saes };
    const { whole, split } = await wholeAndResumed(settings, 16, 8, ["webgpu", "webgpu"]);
    for (const [sae, recipe] of [
      ["topk", "topk"],
      ["btk", "batchtopk"],
      ["mat", "matryoshka"],
    ] as const) {
      const [a, b] = [checkpoint(whole, sae, recipe, 48, 16), checkpoint(split, sae, recipe, 48, 16)];
      compareStates(a, b, recipe, 1e-4, sae);
      assert.deepEqual(b.meta.step, a.meta.step);
    }
  });

  test("a device checkpoint holds the device state exactly: uploaded again, it reads back bit for bit", async () => {
    const dir = runDir();
    await train(dir, { steps: 6, executionProvider: "webgpu", saes: [{ name: "g", recipe: "gated", width: 32, lr: 0.01 }] }, fp32);
    const saved = checkpoint(dir, "g", "gated", 32, 6);
    const session = await StepSession.create(smallSpec({ recipe: "gated", dModel: D, width: 32, batchSize: ROWS }), saved.state, 1, WEBGPU);
    try {
      const again = loadCheckpoint(checkpointPath(join(dir, "g", "checkpoints"), 6), "gated", 32, D);
      const read = await session.readState();
      for (const s of stateOf("gated")) assert.deepEqual(Array.from(stateTensor(read, s)), Array.from(stateTensor(again.state, s)), s);
    } finally {
      await session.close();
    }
  });

  test("a CPU checkpoint resumes on WebGPU, and a WebGPU checkpoint on the CPU, to within 1e-4 of an all-CPU run", async () => {
    const saes = [
      { name: "topk", recipe: "topk", width: 48, k: 3, lr: 0.01 },
      { name: "gated", recipe: "gated", width: 48, lr: 0.01, l1Coefficient: 0.5 },
    ];
    const settings = { steps: 16, checkpointEvery: 8, gradClipNorm: 5, saes };
    const toGpu = await wholeAndResumed(settings, 16, 8, ["cpu", "webgpu"]);
    const toCpu = runDir();
    await train(toCpu, { ...settings, executionProvider: "webgpu" }, fp32.slice(0, 8));
    await train(toCpu, { ...settings, executionProvider: "cpu" }, fp32.slice(8, 16));
    for (const [sae, recipe] of [
      ["topk", "topk"],
      ["gated", "gated"],
    ] as const) {
      const cpu = checkpoint(toGpu.whole, sae, recipe, 48, 16);
      compareStates(cpu, checkpoint(toGpu.split, sae, recipe, 48, 16), recipe, 1e-4, `${sae} cpu -> webgpu`);
      compareStates(cpu, checkpoint(toCpu, sae, recipe, 48, 16), recipe, 1e-4, `${sae} webgpu -> cpu`);
    }
  });

  test("a bf16 sweep of every recipe with Llama Scope's schedule trains and exports on WebGPU as on the CPU", async () => {
    const settings = {
      steps: 20,
      kAnnealFraction: 0.3,
      gradClipNorm: 5,
      unitNormDecoder: false,
      decoderInitNorm: 0.5,
      lrDecayStart: 0.8,
      lrEndRatio: 0.01,
      exportOnFinish: true,
      jumprelu: { calibrationTokens: 2 * ROWS },
      saes: [
        { name: "jump", recipe: "jumprelu", width: 48, k: 3, kStart: 12, lr: 0.01 },
        { name: "btk", recipe: "batchtopk", width: 48, k: 3, lr: 0.01 },
        { name: "mat", recipe: "matryoshka", width: 48, k: 3, kStart: 9, prefixes: [8, 24], lr: 0.01 },
        { name: "relu", recipe: "relu", width: 48, lr: 0.01, l1Coefficient: 0.5, l1WarmupSteps: 4 },
        { name: "gated", recipe: "gated", width: 48, lr: 0.01, l1Coefficient: 0.5 },
        { name: "jrt", recipe: "jumprelu_trained", width: 48, lr: 0.01, jumpreluSparsityLossMode: "tanh", jumpreluBandwidth: 0.5 },
      ],
    };
    const [cpu, gpu] = [runDir(), runDir()];
    const a = await train(cpu, { ...settings, executionProvider: "cpu" }, bf16);
    const b = await train(gpu, { ...settings, executionProvider: "webgpu" }, bf16);
    assert.equal(b.step, 20);
    assert.equal(b.exports.length, 6);
    assert.equal(a.exports.length, 6);
    for (const [sae, recipe] of [
      ["jump", "topk"],
      ["btk", "batchtopk"],
      ["mat", "matryoshka"],
      ["relu", "relu"],
      ["gated", "gated"],
      ["jrt", "jumprelu_trained"],
    ] as const) {
      compareStates(checkpoint(cpu, sae, recipe, 48, 20), checkpoint(gpu, sae, recipe, 48, 20), recipe, 1e-3, sae);
    }
    for (const sae of ["jump", "btk", "mat", "jrt"]) {
      const [x, y] = [loadSaeLens(join(cpu, sae, "sae_lens")), loadSaeLens(join(gpu, sae, "sae_lens"))];
      const [tx, ty] = [x.tensors.threshold!.data as Float32Array, y.tensors.threshold!.data as Float32Array];
      tx.forEach((v, i) =>
        assert.ok(Math.abs(v - ty[i]!) <= 1e-2 * Math.max(Math.abs(v), 1e-3), `${sae} threshold[${i}] ${v} vs ${ty[i]}`),
      );
    }
  });

  test("a device without room for the sweep is refused at start, naming trainer.executionProvider and what the sweep needs", async () => {
    // [1024, 524288] pre-activations are 2 GiB: over SwiftShader's 1 GiB buffer limit, so refused before anything is allocated.
    const config = testConfig(
      runDir(),
      { batchSize: 1024, executionProvider: "webgpu", saes: [{ name: "wide", recipe: "topk", width: 524288, k: 32 }] },
      { dModel: 64 },
    );
    const lines: string[] = [];
    await assert.rejects(startTrainer(config, { source: new ArrayBatchSource([]), log: (l) => lines.push(l) }), (err: unknown) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.deepEqual(err.keys, ["trainer.executionProvider"]);
      assert.match(err.message, /webgpu cannot make one buffer of 2\.00 GiB for the pre-activations \[1024, 524288\] of wide/);
      assert.match(err.message, /the sweep's state is 774\.0 MiB \(weights and Adam moments, float32\)/);
      assert.match(err.message, /set trainer\.executionProvider=cpu/);
      return true;
    });
    assert.deepEqual(lines, [], "nothing was started");
  });
});
