import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { loadConfig } from "../../services/common/config/index.js";
import { ArrayBatchSource } from "../../services/trainer/batches.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { activeK, learningRate } from "../../services/trainer/schedule.js";
import { hookConfig } from "../../services/trainer/hook.js";
import { Training } from "../../services/trainer/training.js";
import { loadSae, saeForward } from "../../tools/eval/sae.js";
import { asBatches, explainedVariance, readJsonl, saeLensForward, sparseData } from "./fixtures.js";

const preset = (name: string) => join(import.meta.dirname, "../../deploy/configs", `${name}.yaml`);

describe("Llama Scope presets", () => {
  for (const [name, width, tokens] of [
    ["llama-scope-8x", 8 * 4096, 800e6],
    ["llama-scope-32x", 32 * 4096, 1.6e9],
  ] as const) {
    test(`${name} loads and validates, with Llama Scope's settings`, () => {
      const c = loadConfig({ file: preset(name) });
      const t = c.trainer;
      assert.equal(c.buffer.hookPoints[0]!.dModel, 4096);
      assert.deepEqual(t.hookPoints, ["blocks.15.hook_resid_post"]);
      assert.deepEqual([c.buffer.dtype, c.producer.dtype], ["bf16", "bf16"]);
      assert.equal(c.buffer.capacityRows, 500_000);
      assert.equal(c.producer.contextLength, 1024);
      assert.equal(t.batchSize, 2048);
      assert.equal(t.steps * t.batchSize, tokens);
      assert.deepEqual(t.adam, { beta1: 0.9, beta2: 0.9999, eps: 1e-8 });
      assert.deepEqual([t.lrDecay, t.lrDecayStart, t.lrEndRatio, t.kAnnealFraction], ["linear", 0.8, 0.01, 0.1]);
      assert.deepEqual([t.unitNormDecoder, t.decoderInitNorm], [false, 0.5]);
      assert.ok(t.gradClipNorm > 0);
      assert.equal(t.executionProvider, "webgpu", "the step on the GPU, with the state kept there");
      assert.equal(t.saes.length, 1);
      const sae = t.saes[0]!;
      assert.deepEqual([sae.recipe, sae.width, sae.k, sae.kStart], ["jumprelu", width, 50, 4096]);
    });

    test(`${name}: every setting says where it comes from`, () => {
      const lines = readFileSync(preset(name), "utf8").split("\n");
      // A setting is a "key: value" line (or a list item holding one); a section heading has no value.
      // Its comment ends the line or, for a long one, fills the lines just above it.
      const settings = lines.map((l, i) => ({ l, above: lines[i - 1] ?? "" })).filter(({ l }) => /^\s*(- )?[A-Za-z]+: \S/.test(l));
      assert.ok(settings.length > 30);
      const bare = settings.filter(({ l, above }) => !l.includes(" # ") && !above.trimStart().startsWith("#")).map(({ l }) => l);
      assert.deepEqual(bare, [], "settings without a comment");
    });
  }
});

describe("tiny preset", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-presets-"));
  after(() => rmSync(root, { recursive: true, force: true }));

  test("trains its sweep with the Llama Scope schedule; k and the learning rate take their documented values", async (t) => {
    const config = loadConfig({ file: preset("tiny"), sets: [`run.dir=${root}`, "trainer.threads=1"] });
    const c = hookConfig(config, config.trainer.hookPoints[0]!);
    const data = sparseData({ d: c.dModel, features: 128, active: 4, rows: c.batchSize, batches: c.steps, seed: "tiny" });
    const result = await new Training({ config, source: new ArrayBatchSource(asBatches(data.batches, c.batchSize, c.dModel)) }).run();
    assert.equal(result.step, c.steps);
    const annealSteps = Math.floor(c.kAnnealFraction * c.steps);
    const lrOf = (peak: number, step: number) =>
      learningRate(
        { peak, steps: c.steps, warmupSteps: c.lrWarmupSteps, decay: c.lrDecay, decayStart: c.lrDecayStart, endRatio: c.lrEndRatio },
        step,
      );
    for (const sae of c.saes) {
      const lines = readJsonl(join(root, sae.name, "metrics.jsonl"));
      assert.equal(lines.length, c.steps / c.logEvery);
      for (const line of lines) {
        // A line reports the k and learning rate of the step that ended its window.
        const step = (line.step as number) - 1;
        if (sae.recipe !== "gated")
          assert.equal(line.k, activeK({ k: sae.k, kStart: sae.kStart, annealSteps }, step), `${sae.name} k at step ${step}`);
        assert.equal(line.learning_rate, lrOf(sae.lr, step), `${sae.name} learning rate at step ${step}`);
      }
      if (sae.recipe !== "gated") {
        // kStart 64, k 8 over 20 steps: steps 9 and 19 run at ceil(8 + 56 * 11/20) = 39 and ceil(8 + 56/20) = 11, then 8.
        assert.deepEqual(
          lines.slice(0, 3).map((l) => l.k),
          [39, 11, 8],
        );
        assert.ok((lines[0]!.l0 as number) > 30 && lines.at(-1)!.l0 === 8, "L0 follows k down");
      }
      // Annealing k down, and warming the L1 weight up, make the loss rise at first; once both settle it falls.
      const settled = lines.findIndex((l) => (l.step as number) > Math.max(annealSteps, sae.recipe === "gated" ? sae.l1WarmupSteps : 0));
      assert.ok((lines.at(-1)!.loss as number) < 0.8 * (lines[settled]!.loss as number), `${sae.name} loss falls`);
      assert.ok(lines.every((l) => (l.grad_norm as number) > 0));
    }
    const lastLr = readJsonl(join(root, "jumprelu-k8", "metrics.jsonl")).at(-1)!.learning_rate as number;
    assert.ok(Math.abs(lastLr - 0.004 * (0.01 + 0.99 / 40)) < 1e-12, "the last step is one 40th of the cool-down above 1% of the peak");

    // Every export loads in SAELens' layout and in tools/eval, with unit decoder rows and sparsity.safetensors beside it.
    assert.deepEqual(
      result.exports.map((dir) => loadSaeLens(dir).cfg.architecture),
      ["jumprelu", "jumprelu", "gated"],
    );
    const x = data.batches.at(-1)!;
    for (const dir of result.exports) {
      const exp = loadSaeLens(dir);
      const n = exp.cfg.d_sae as number;
      const wDec = exp.tensors.W_dec!.data as Float32Array;
      const norms = Array.from({ length: n }, (_, i) => Math.hypot(...wDec.subarray(i * c.dModel, (i + 1) * c.dModel)));
      assert.ok(Math.max(...norms) / Math.min(...norms) < 1 + 1e-5, `${dir}: decoder norms are folded into the encoder`);
      assert.equal(exp.sparsity!.length, n);
      assert.equal((exp.cfg.saeflow as { sparsity_tokens: number }).sparsity_tokens, c.sparsityWindowTokens);
      const reference = saeLensForward(exp, x);
      const ours = saeForward(loadSae(dir), x, c.batchSize);
      const ev = explainedVariance(x, ours.recon, c.dModel);
      t.diagnostic(
        `${exp.cfg.architecture} ${dir}: explained variance ${ev.toFixed(3)}, L0 ${(ours.l0.reduce((a, v) => a + v, 0) / c.batchSize).toFixed(2)}`,
      );
      assert.ok(Math.abs(ev - explainedVariance(x, reference.recon, c.dModel)) < 1e-4, "tools/eval runs the export as SAELens does");
      assert.ok(ev > 0.5);
    }
  });
});
