import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { ArrayBatchSource } from "../../services/trainer/batches.js";
import { learningRate, rampedCoefficient } from "../../services/trainer/schedule.js";
import { Trainer } from "../../services/trainer/trainer.js";
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

  test("k larger than the width is refused naming the key", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, width: 64, k: 65}]"] }));
    assert.deepEqual(err.keys, ["trainer.saes.0.k"]);
    assert.match(err.message, /trainer\.saes\.0\.k: k \(65\) exceeds width \(64\)/);
  });

  test("an unknown recipe is refused naming the key", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a}, {name: b, recipe: gated}]"] }));
    assert.deepEqual(err.keys, ["trainer.saes.1.recipe"]);
    assert.match(err.message, /trainer\.saes\.1\.recipe/);
  });

  test("kAux beyond the width and duplicate SAE names are refused naming their keys", () => {
    const err = refused(() => loadConfig({ sets: ["trainer.saes=[{name: a, width: 64, k: 8, kAux: 100}, {name: a, width: 64, k: 8}]"] }));
    assert.deepEqual(err.keys.sort(), ["trainer.saes.0.kAux", "trainer.saes.1.name"]);
  });

  test("a dModel that differs from the buffer's pool in the same run config is refused naming trainer.dModel", () => {
    const err = refused(() => loadConfig({ sets: ["buffer.hookPoints=[{name: blocks.1.hook_resid_post, dModel: 128}]", "trainer.dModel=64"] }));
    assert.deepEqual(err.keys, ["trainer.dModel"]);
  });

  const dir = mkdtempSync(join(tmpdir(), "saeflow-trainer-cfg-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("batches of another width than trainer.dModel stop training with an error naming the key", async () => {
    const config = testConfig(dir, { dModel: 16, batchSize: 8, steps: 5, saes: [{ name: "a", width: 32, k: 4 }] });
    const wrong = [{ data: gaussianBatch(8, 12, "w"), dtype: "fp32" as const, rows: 8, dModel: 12, traceparent: "" }];
    const trainer = new Trainer({ config, source: new ArrayBatchSource(wrong) });
    await assert.rejects(trainer.run(), (err: unknown) => err instanceof ConfigError && err.keys[0] === "trainer.dModel");
  });
});

describe("schedules", () => {
  const s = { peak: 1, steps: 100, warmupSteps: 10, decay: "linear" as const, decayStart: 0.8 };

  test("learning rate warms up linearly, holds, then decays to near 0", () => {
    assert.equal(learningRate(s, 0), 0.1);
    assert.equal(learningRate(s, 9), 1);
    assert.equal(learningRate(s, 50), 1);
    assert.equal(learningRate(s, 90), 0.5);
    assert.ok(learningRate(s, 99) < 0.06);
    assert.ok(Math.abs(learningRate({ ...s, decay: "cosine" }, 90) - 0.5) < 1e-12);
    assert.equal(learningRate({ ...s, decay: "none" }, 99), 1);
  });

  test("the L1 coefficient ramps up over its warm-up", () => {
    assert.equal(rampedCoefficient(4, 4, 0), 1);
    assert.equal(rampedCoefficient(4, 4, 10), 4);
    assert.equal(rampedCoefficient(4, 0, 0), 4);
  });
});
