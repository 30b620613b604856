import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { trainerHookPoints } from "../../services/common/shards.js";
import { ArrayBatchSource } from "../../services/trainer/batches.js";
import { hookConfig, hookDir, processHookPoints } from "../../services/trainer/hook.js";
import { activeK, learningRate, rampedCoefficient } from "../../services/trainer/schedule.js";
import { Training } from "../../services/trainer/training.js";
import { gaussianBatch, testConfig } from "./fixtures.js";

function refused(fn: () => unknown): ConfigError {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected a ConfigError, got ${String(err)}`);
    return err;
  }
  assert.fail("the config was accepted");
}

describe("trainer config", () => {
  test("defaults describe a TopK sweep of one SAE with Llama Scope's recipe pieces", () => {
    const t = loadConfig().trainer;
    assert.equal(t.saes[0]!.recipe, "topk");
    assert.equal(t.saes[0]!.auxKCoefficient, 1 / 32);
    assert.equal(t.normalizeActivations, "expected_average");
    assert.equal(t.unitNormDecoder, true);
    assert.deepEqual(t.adam, { beta1: 0.9, beta2: 0.999, eps: 1e-8 });
  });

  test("the step runs on the CPU unless trainer.executionProvider names a GPU provider, which is checked", () => {
    const t = loadConfig().trainer;
    assert.deepEqual([t.executionProvider, t.deviceId], ["cpu", 0]);
    const gpu = loadConfig({ sets: ["trainer.executionProvider=webgpu", "trainer.deviceId=1"] }).trainer;
    assert.deepEqual([gpu.executionProvider, gpu.deviceId], ["webgpu", 1]);
    assert.deepEqual(refused(() => loadConfig({ sets: ["trainer.executionProvider=tpu"] })).keys, ["trainer.executionProvider"]);
    assert.deepEqual(refused(() => loadConfig({ sets: ["trainer.deviceId=-1"] })).keys, ["trainer.deviceId"]);
  });

  test("k larger than the width is refused naming the key", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, width: 64, k: 65}]"] }));
    assert.deepEqual(err.keys, ["trainer.saes.0.k"]);
    assert.match(err.message, /trainer\.saes\.0\.k: k \(65\) exceeds width \(64\)/);
  });

  test("an unknown recipe is refused naming the key", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a}, {name: b, recipe: vanilla}]"] }));
    assert.deepEqual(err.keys, ["trainer.saes.1.recipe"]);
    assert.match(err.message, /trainer\.saes\.1\.recipe/);
  });

  test("kAux beyond the width and duplicate SAE names are refused naming their keys", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, width: 64, k: 8, kAux: 100}, {name: a, width: 64, k: 8}]"] }));
    assert.deepEqual(err.keys.sort(), ["trainer.saes.0.kAux", "trainer.saes.1.name"]);
  });

  test("the Llama Scope options default to the plain schedule, so configs without them train as before", () => {
    const t = loadConfig().trainer;
    assert.deepEqual([t.saes[0]!.kStart, t.lrEndRatio, t.gradClipNorm, t.decoderInitNorm], [0, 0, 0, 1]);
    assert.deepEqual(t.saes[0]!.prefixes, []);
  });

  test("a kStart outside k..width, or on a recipe without a top k, is refused naming the key", () => {
    const low = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, width: 64, k: 8, kStart: 4}]"] }));
    assert.deepEqual(low.keys, ["trainer.saes.0.kStart"]);
    assert.match(low.message, /kStart \(4\) must lie between k \(8\) and width \(64\)/);
    const gated = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, recipe: gated, kStart: 100}]"] }));
    assert.deepEqual(gated.keys, ["trainer.saes.0.kStart"]);
  });

  test("matryoshka prefixes must exist, increase, and lie between k and the width, naming the key", () => {
    const none = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, recipe: matryoshka, width: 64, k: 4}]"] }));
    assert.deepEqual(none.keys, ["trainer.saes.0.prefixes"]);
    const bad = refused(() =>
      loadConfig({ sets: ["trainer.saes=[{name: a, recipe: matryoshka, width: 64, k: 4, prefixes: [16, 8, 64]}]"] }),
    );
    assert.match(bad.message, /prefixes must increase \(16 then 8\)/);
    assert.match(bad.message, /prefix 64 must be at least k \(4\) and below width \(64\)/);
    const other = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, recipe: batchtopk, width: 64, k: 4, prefixes: [16]}]"] }));
    assert.deepEqual(other.keys, ["trainer.saes.0.prefixes"]);
    assert.equal(
      loadConfig({ sets: ["trainer.saes=[{name: a, recipe: matryoshka, width: 64, k: 4, prefixes: [4, 16]}]"] }).trainer.saes[0]!.prefixes
        .length,
      2,
    );
  });

  test("jumprelu_trained defaults to SAELens' JumpReLU training settings and refuses bad ones naming the key", () => {
    const sae = loadConfig({ sets: ["trainer.saes=[{name: a, recipe: jumprelu_trained}]"] }).trainer.saes[0]!;
    assert.deepEqual(
      [
        sae.l0Coefficient,
        sae.l0WarmupSteps,
        sae.jumpreluBandwidth,
        sae.jumpreluInitThreshold,
        sae.jumpreluSparsityLossMode,
        sae.jumpreluTanhScale,
        sae.preActLossCoefficient,
      ],
      [1, 0, 0.05, 0.01, "step", 4, 0],
    );
    const bad = (set: string) => refused(() => loadConfig({ sets: [`trainer.saes=[{name: a, recipe: jumprelu_trained, ${set}}]`] })).keys;
    assert.deepEqual(bad("jumpreluBandwidth: 0"), ["trainer.saes.0.jumpreluBandwidth"]);
    assert.deepEqual(bad("jumpreluInitThreshold: 0"), ["trainer.saes.0.jumpreluInitThreshold"]);
    assert.deepEqual(bad("jumpreluSparsityLossMode: l1"), ["trainer.saes.0.jumpreluSparsityLossMode"]);
    assert.deepEqual(bad("jumpreluTanhScale: -1"), ["trainer.saes.0.jumpreluTanhScale"]);
    assert.deepEqual(bad("l0Coefficient: -1"), ["trainer.saes.0.l0Coefficient"]);
    assert.deepEqual(bad("preActLossCoefficient: -3e-6"), ["trainer.saes.0.preActLossCoefficient"]);
    assert.deepEqual(bad("kStart: 100"), ["trainer.saes.0.kStart"]);
  });

  test("jumprelu_trained's keys on another recipe (jumprelu trains as TopK) are refused naming the key", () => {
    const err = refused(() =>
      loadConfig({ sets: ["trainer.saes=[{name: a, recipe: jumprelu, l0Coefficient: 0.5, jumpreluTanhScale: 2}]"] }),
    );
    assert.deepEqual(err.keys.sort(), ["trainer.saes.0.jumpreluTanhScale", "trainer.saes.0.l0Coefficient"]);
    assert.match(err.message, /only jumprelu_trained trains with l0Coefficient, not jumprelu/);
  });

  test("a decoder init norm that unit-norm decoders would undo is refused naming trainer.decoderInitNorm", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.decoderInitNorm=0.5"] }));
    assert.deepEqual(err.keys, ["trainer.decoderInitNorm"]);
    assert.equal(loadConfig({ sets: ["trainer.decoderInitNorm=0.5", "trainer.unitNormDecoder=false"] }).trainer.decoderInitNorm, 0.5);
  });

  test("a hook point with no pool in the same run config is refused naming trainer.hookPoints", () => {
    const err = refused(() =>
      loadConfig({
        sets: [
          "buffer.hookPoints=[{name: blocks.1.hook_resid_post, dModel: 128}]",
          "trainer.hookPoints=[blocks.1.hook_resid_post, blocks.2.hook_resid_post]",
        ],
      }),
    );
    assert.deepEqual(err.keys, ["trainer.hookPoints.1"]);
    assert.deepEqual(refused(() => loadConfig({ sets: ["trainer.shardCount=2", "trainer.shardIndex=2"] })).keys, ["trainer.shardIndex"]);
    assert.deepEqual(refused(() => loadConfig({ sets: ["trainer.hookPoints=[]"] })).keys, ["trainer.hookPoints"]);
  });

  test("trainer.dModel, trainer.hookPoint and trainer.bufferAddress are gone: widths and addresses come from the buffer's table", () => {
    for (const gone of ["trainer.dModel=64", "trainer.hookPoint=blocks.1.hook_resid_post", "trainer.bufferAddress=127.0.0.1:1"])
      assert.ok(refused(() => loadConfig({ sets: [gone] })).message.includes(gone.split("=")[0]!.split(".")[1]!), gone);
  });

  test("trainer processes share trainer.hookPoints round-robin: 3 trainers x 4 hook points", () => {
    const hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"];
    const c = loadConfig({
      sets: [`buffer.hookPoints=[${hooks.map((h) => `{name: ${h}, dModel: 16}`).join(", ")}]`, `trainer.hookPoints=[${hooks.join(", ")}]`],
    });
    const split = [0, 1, 2].map((i) => trainerHookPoints(c.trainer, i, 3));
    assert.deepEqual(split, [[hooks[0], hooks[3]], [hooks[1]], [hooks[2]]]);
    assert.deepEqual(split.flat().sort(), [...hooks].sort(), "every hook point is trained, by one trainer");
    // The process's own share, from its shardIndex/shardCount, and its folders: one per hook point.
    const second = loadConfig({
      sets: [
        `buffer.hookPoints=[${hooks.map((h) => `{name: ${h}, dModel: ${16 + hooks.indexOf(h)}}`).join(", ")}]`,
        `trainer.hookPoints=[${hooks.join(", ")}]`,
        "trainer.shardIndex=0",
        "trainer.shardCount=3",
        "run.dir=/runs/r",
      ],
    });
    assert.deepEqual(processHookPoints(second), [hooks[0], hooks[3]]);
    assert.deepEqual(
      processHookPoints(second).map((h) => [hookDir(second, h), hookConfig(second, h).dModel]),
      [
        [`/runs/r/${hooks[0]}`, 16],
        [`/runs/r/${hooks[3]}`, 19],
      ],
    );
    // One hook point in the run: its SAEs live in the run folder itself, as before.
    assert.equal(hookDir(loadConfig({ sets: ["run.dir=/runs/one"] }), "blocks.1.hook_resid_post"), "/runs/one");
    // More trainers than hook points: several trainers train one hook point's sweep.
    assert.deepEqual(
      [0, 1, 2].map((i) => trainerHookPoints({ hookPoints: hooks.slice(0, 2) }, i, 3)),
      [[hooks[0]], [hooks[1]], [hooks[0]]],
    );
  });

  const dir = mkdtempSync(join(tmpdir(), "saeflow-trainer-cfg-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("batches of another width than the pool's stop training with an error naming buffer.hookPoints", async () => {
    const config = testConfig(dir, { batchSize: 8, steps: 5, saes: [{ name: "a", width: 32, k: 4 }] }, { dModel: 16 });
    const wrong = [{ data: gaussianBatch(8, 12, "w"), dtype: "fp32" as const, rows: 8, dModel: 12, traceparent: "" }];
    const training = new Training({ config, source: new ArrayBatchSource(wrong) });
    await assert.rejects(training.run(), (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.keys, ["buffer.hookPoints.0.dModel"]);
      assert.match(err.message, /16 for blocks\.1\.hook_resid_post, but the batches have rows of width 12/);
      return true;
    });
  });
});

describe("schedules", () => {
  const s = { peak: 1, steps: 100, warmupSteps: 10, decay: "linear" as const, decayStart: 0.8, endRatio: 0 };

  test("learning rate warms up linearly, holds, then decays to near 0", () => {
    assert.equal(learningRate(s, 0), 0.1);
    assert.equal(learningRate(s, 9), 1);
    assert.equal(learningRate(s, 50), 1);
    assert.equal(learningRate(s, 90), 0.5);
    assert.ok(learningRate(s, 99) < 0.06);
    assert.ok(Math.abs(learningRate({ ...s, decay: "cosine" }, 90) - 0.5) < 1e-12);
    assert.equal(learningRate({ ...s, decay: "none" }, 99), 1);
  });

  test("Llama Scope's learning rate: warm-up, then a cool-down over the last 20% to 1% of the peak", () => {
    // The 8x preset: 390,625 steps, warm-up 5,000, cool-down from step 312,500.
    const ls = { peak: 8e-4, steps: 390625, warmupSteps: 5000, decay: "linear" as const, decayStart: 0.8, endRatio: 0.01 };
    assert.equal(learningRate(ls, 0), 8e-4 / 5000);
    assert.equal(learningRate(ls, 2499), 8e-4 / 2);
    assert.equal(learningRate(ls, 4999), 8e-4);
    assert.equal(learningRate(ls, 312499), 8e-4, "flat until the cool-down");
    assert.equal(learningRate(ls, 312500), 8e-4, "the cool-down starts at the peak");
    assert.ok(Math.abs(learningRate(ls, 351562.5) - 8e-4 * (0.01 + 0.99 * 0.5)) < 1e-15, "halfway: halfway to 1%");
    assert.ok(Math.abs(learningRate(ls, 390625) - 8e-6) < 1e-15, "1% of the peak one step past the last");
    assert.ok(Math.abs(learningRate(ls, 390624) - 8e-4 * (0.01 + 0.99 / 78125)) < 1e-15, "the last step: one 78,125th above 1%");
    assert.ok(Math.abs(learningRate({ ...ls, decay: "cosine" }, 390625) - 8e-6) < 1e-15);
  });

  test("Llama Scope's k annealing: from kStart down to k over the first 10% of steps, then k", () => {
    const ks = { k: 50, kStart: 4096, annealSteps: Math.floor(0.1 * 390625) };
    assert.equal(ks.annealSteps, 39062);
    assert.equal(activeK(ks, 0), 4096);
    assert.equal(activeK(ks, 19531), Math.ceil(50 + 4046 * (1 - 19531 / 39062)), "halfway");
    assert.equal(activeK(ks, 19531), 2073);
    assert.equal(activeK(ks, 39061), 51);
    assert.equal(activeK(ks, 39062), 50);
    assert.equal(activeK(ks, 390624), 50);
    for (let step = 1; step < 39062; step += 997) assert.ok(activeK(ks, step) <= activeK(ks, step - 1), "never rises");
    assert.equal(activeK({ k: 50, kStart: 0, annealSteps: 100 }, 0), 50, "kStart 0: no annealing");
  });

  test("the L1 coefficient ramps up over its warm-up", () => {
    assert.equal(rampedCoefficient(4, 4, 0), 1);
    assert.equal(rampedCoefficient(4, 4, 10), 4);
    assert.equal(rampedCoefficient(4, 0, 0), 4);
  });
});
