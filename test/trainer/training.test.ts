import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { fp32ToFp16 } from "../../services/common/tensor-codec.js";
import { ConfigError } from "../../services/common/config/index.js";
import { ArrayBatchSource, type Batch, type BatchSource } from "../../services/trainer/batches.js";
import { checkpointPath, checkpointSteps, loadCheckpoint, saveCheckpoint } from "../../services/trainer/checkpoint.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { logSparsity } from "../../services/trainer/firing.js";
import { stateOf, type StepRecipe } from "../../services/trainer/graph/step.js";
import { evaluate, toParams64 } from "../../services/trainer/reference.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState, normalisationScale, stateTensor } from "../../services/trainer/sae.js";
import { Training } from "../../services/trainer/training.js";
import { loadSae, saeForward } from "../../tools/eval/sae.js";
import { asBatches, bestCosines, explainedVariance, readJsonl, saeLensForward, smallSpec, sparseData, testConfig } from "./fixtures.js";

const root = mkdtempSync(join(tmpdir(), "saeflow-trainer-"));
after(() => rmSync(root, { recursive: true, force: true }));
let runs = 0;
const runDir = () => join(root, `run-${runs++}`);

// 48 unit directions in d=32; every token sums 3 of them. An SAE of 96 latents with k=3 should find them.
const D = 32;
const ROWS = 256;
const data = sparseData({ d: D, features: 48, active: 3, rows: ROWS, batches: 600, seed: "planted" });
const batches = asBatches(data.batches, ROWS, D);

async function train(dir: string, trainer: Record<string, unknown>, source: Batch[]) {
  const config = testConfig(dir, { batchSize: ROWS, ...trainer }, { dModel: D });
  const t = new Training({ config, source: new ArrayBatchSource(source) });
  return { result: await t.run(), config };
}

const finalState = (dir: string, sae: string, width: number, step: number, recipe: StepRecipe = "topk") =>
  loadCheckpoint(checkpointPath(join(dir, sae, "checkpoints"), step), recipe, width, D);

describe("training on planted sparse directions", () => {
  test("TopK: the loss falls and the SAE recovers most planted directions", async (t) => {
    const dir = runDir();
    const { result } = await train(dir, { steps: 300, saes: [{ name: "topk", recipe: "topk", width: 96, k: 3, lr: 0.01 }] }, batches);
    assert.equal(result.step, 300);
    const lines = readJsonl(join(dir, "topk", "metrics.jsonl"));
    assert.equal(lines.length, 12);
    for (const key of [
      "mse",
      "fvu",
      "explained_variance",
      "l0",
      "dead_fraction",
      "tokens",
      "tokens_per_second",
      "wait_ms",
      "loss",
      "learning_rate",
    ]) {
      assert.equal(typeof lines[0]![key], "number", key);
    }
    assert.ok((lines.at(-1)!.loss as number) < 0.2 * (lines[0]!.loss as number), "loss falls by 5x");
    assert.ok((lines.at(-1)!.explained_variance as number) > 0.95);
    assert.equal(lines.at(-1)!.l0, 3);
    const cos = bestCosines(data.directions, finalState(dir, "topk", 96, 300).state.W_dec, D);
    t.diagnostic(`recovered ${cos.filter((c) => c > 0.9).length}/48, loss ${lines[0]!.loss} -> ${lines.at(-1)!.loss}`);
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.9 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
  });

  test("BatchTopK recovers them too and exports its running threshold as a SAELens JumpReLU", async (t) => {
    const dir = runDir();
    const { result } = await train(
      dir,
      { steps: 300, exportOnFinish: true, saes: [{ name: "btk", recipe: "batchtopk", width: 96, k: 3, lr: 0.01 }] },
      batches,
    );
    const cos = bestCosines(data.directions, finalState(dir, "btk", 96, 300).state.W_dec, D);
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.8 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
    const exp = loadSaeLens(result.exports[0]!);
    assert.equal(exp.cfg.architecture, "jumprelu");
    const threshold = exp.tensors.threshold!.data as Float32Array;
    assert.ok(threshold[0]! > 0 && threshold.every((v) => v === threshold[0]), "one positive threshold for every latent");
    const x = data.batches[599]!;
    const { codes, recon } = saeLensForward(exp, x);
    const l0 = codes.reduce((a, v) => a + (v > 0 ? 1 : 0), 0) / ROWS;
    t.diagnostic(`recovered ${cos.filter((c) => c > 0.9).length}/48, inference L0 ${l0}, threshold ${threshold[0]}`);
    assert.ok(l0 > 2 && l0 < 4.5, `inference L0 ${l0} near k=3`);
    assert.ok(explainedVariance(x, recon, D) > 0.9);
  });

  test("ReLU + L1: sparsity rises and most directions are found", async (t) => {
    const dir = runDir();
    await train(
      dir,
      { steps: 600, saes: [{ name: "relu", recipe: "relu", width: 96, lr: 0.003, l1Coefficient: 2, l1WarmupSteps: 50 }] },
      batches,
    );
    const lines = readJsonl(join(dir, "relu", "metrics.jsonl"));
    assert.ok((lines.at(-1)!.l0 as number) < 0.5 * (lines[0]!.l0 as number), "L1 drives L0 down");
    assert.ok((lines.at(-1)!.penalty as number) > 0);
    const cos = bestCosines(data.directions, finalState(dir, "relu", 96, 600).state.W_dec, D);
    t.diagnostic(`recovered ${cos.filter((c) => c > 0.9).length}/48, L0 ${lines[0]!.l0} -> ${lines.at(-1)!.l0}`);
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.75 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
  });

  test("JumpReLU: the TopK SAE converts to thresholds that keep its sparsity", async (t) => {
    const dir = runDir();
    const { result } = await train(
      dir,
      {
        steps: 300,
        exportOnFinish: true,
        jumprelu: { calibrationTokens: 2048 },
        saes: [{ name: "jump", recipe: "jumprelu", width: 96, k: 3, lr: 0.01 }],
      },
      batches,
    );
    const exp = loadSaeLens(result.exports[0]!);
    assert.equal(exp.cfg.architecture, "jumprelu");
    assert.deepEqual(exp.tensors.threshold!.shape, [96]);
    const x = data.batches[599]!;
    const { codes, recon } = saeLensForward(exp, x);
    const l0 = codes.reduce((a, v) => a + (v > 0 ? 1 : 0), 0) / ROWS;
    t.diagnostic(`JumpReLU L0 ${l0}, explained variance ${explainedVariance(x, recon, D)}`);
    assert.ok(Math.abs(l0 - 3) < 0.5, `JumpReLU L0 ${l0} keeps k=3`);
    assert.ok(explainedVariance(x, recon, D) > 0.9);
  });
});

describe("JumpReLU trained directly on planted sparse directions", () => {
  test("with SAELens' defaults and an L0 warm-up, L0 falls to the planted 3, the directions are recovered, and the export infers as trained", async (t) => {
    const dir = runDir();
    const sae = { name: "jrt", recipe: "jumprelu_trained", width: 96, lr: 0.01, l0WarmupSteps: 50 };
    const { result } = await train(dir, { steps: 300, exportOnFinish: true, saes: [sae] }, batches);
    const lines = readJsonl(join(dir, "jrt", "metrics.jsonl"));
    const [first, last] = [lines[0]!, lines.at(-1)!];
    assert.ok((first.l0 as number) > 5 * (last.l0 as number), `the L0 penalty drives L0 down: ${first.l0} -> ${last.l0}`);
    assert.ok((last.l0 as number) > 2 && (last.l0 as number) < 4.5, `L0 ${last.l0} near the planted 3`);
    assert.ok(
      (last.penalty as number) > 0 && Math.abs((last.penalty as number) - (last.l0 as number)) < 1e-3,
      "penalty = l0Coefficient (1) x L0",
    );
    assert.ok((last.explained_variance as number) > 0.9);
    const { state } = finalState(dir, "jrt", 96, 300, "jumprelu_trained");
    const cos = bestCosines(data.directions, state.W_dec, D);
    const exp = loadSaeLens(result.exports[0]!);
    assert.equal(exp.cfg.architecture, "jumprelu");
    assert.deepEqual(
      Array.from(exp.tensors.threshold!.data as Float32Array),
      Array.from(state.threshold!, (v) => Math.max(v, 0)),
      "SAELens' threshold is relu(theta), unit decoder rows folding nothing",
    );
    assert.equal((exp.cfg.saeflow as { jumprelu_bandwidth: number }).jumprelu_bandwidth, 0.05);
    const x = data.batches[599]!;
    const { codes, recon } = saeLensForward(exp, x);
    const l0 = codes.reduce((a, v) => a + (v > 0 ? 1 : 0), 0) / ROWS;
    const ev = explainedVariance(x, recon, D);
    const evEval = explainedVariance(x, saeForward(loadSae(result.exports[0]!), x, ROWS).recon, D);
    t.diagnostic(
      `recovered ${cos.filter((c) => c > 0.9).length}/48, L0 ${first.l0} -> ${last.l0}, export L0 ${l0}, explained variance ${ev}`,
    );
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.9 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
    assert.ok(l0 > 2 && l0 < 4.5, `inference L0 ${l0}`);
    assert.ok(ev > 0.9 && Math.abs(evEval - ev) < 1e-4, `export explained variance ${ev}, tools/eval ${evEval}`);
  });
});

describe("Gated and Matryoshka-BatchTopK on planted sparse directions", () => {
  test("Gated: the loss falls, most directions are recovered, and the SAELens gated export reconstructs", async (t) => {
    const dir = runDir();
    const { result } = await train(
      dir,
      {
        steps: 300,
        exportOnFinish: true,
        saes: [{ name: "gated", recipe: "gated", width: 96, lr: 0.01, l1Coefficient: 5, l1WarmupSteps: 50 }],
      },
      batches,
    );
    const lines = readJsonl(join(dir, "gated", "metrics.jsonl"));
    const [first, last] = [lines[0]!, lines.at(-1)!];
    assert.ok((last.mse as number) < 0.2 * (first.mse as number), "the reconstruction error falls by 5x");
    assert.ok((last.loss as number) < 0.6 * (first.loss as number), "so does the whole loss");
    assert.ok(
      (last.aux_loss as number) > 0 && (last.penalty as number) > 0,
      "the gate's auxiliary reconstruction and sparsity terms are live",
    );
    assert.ok((last.l0 as number) < 5, `L0 ${last.l0}`);
    const cos = bestCosines(data.directions, finalState(dir, "gated", 96, 300, "gated").state.W_dec, D);
    const exp = loadSaeLens(result.exports[0]!);
    assert.equal(exp.cfg.architecture, "gated");
    const x = data.batches[599]!;
    const ev = explainedVariance(x, saeLensForward(exp, x).recon, D);
    const evEval = explainedVariance(x, saeForward(loadSae(result.exports[0]!), x, ROWS).recon, D);
    t.diagnostic(
      `recovered ${cos.filter((c) => c > 0.9).length}/48, L0 ${first.l0} -> ${last.l0}, export explained variance ${ev} (tools/eval ${evEval})`,
    );
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.8 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
    assert.ok(ev > 0.9 && Math.abs(evEval - ev) < 1e-4);
  });

  test("Matryoshka: every nested prefix reconstructs, most directions are recovered, and it exports as JumpReLU", async (t) => {
    const dir = runDir();
    const saes = [{ name: "mat", recipe: "matryoshka", width: 96, k: 3, prefixes: [16, 48], lr: 0.01 }];
    const { result } = await train(dir, { steps: 300, exportOnFinish: true, saes }, batches);
    const lines = readJsonl(join(dir, "mat", "metrics.jsonl"));
    const [first, last] = [lines[0]!, lines.at(-1)!];
    assert.ok((last.loss as number) < 0.5 * (first.loss as number), "the summed loss falls");
    assert.ok((last.prefix_loss as number) < 0.6 * (first.prefix_loss as number), "and so do the inner prefixes' losses");
    assert.ok((last.prefix_loss as number) > (last.mse as number), "two inner prefixes, each at least as lossy as the whole");
    const { state } = finalState(dir, "mat", 96, 300, "matryoshka");
    const cos = bestCosines(data.directions, state.W_dec, D);
    const early = bestCosines(data.directions, state.W_dec.subarray(0, 16 * D), D);
    t.diagnostic(
      `recovered ${cos.filter((c) => c > 0.9).length}/48 (${early.filter((c) => c > 0.9).length} by the first 16 latents), mse ${first.mse} -> ${last.mse}, prefix loss ${first.prefix_loss} -> ${last.prefix_loss}`,
    );
    // The planted directions are flat, not hierarchical: the small prefixes pull some latents toward
    // mixtures of them, so Matryoshka recovers a little less of this data than plain BatchTopK.
    assert.ok(cos.filter((c) => c > 0.9).length >= 0.75 * cos.length, `recovered ${cos.filter((c) => c > 0.9).length}/48`);
    const exp = loadSaeLens(result.exports[0]!);
    assert.equal(exp.cfg.architecture, "jumprelu");
    assert.deepEqual((exp.cfg.saeflow as { prefixes: number[] }).prefixes, [16, 48]);
    const x = data.batches[599]!;
    const { codes, recon } = saeLensForward(exp, x);
    const l0 = codes.reduce((a, v) => a + (v > 0 ? 1 : 0), 0) / ROWS;
    assert.ok(l0 > 2 && l0 < 4.5, `inference L0 ${l0} near k=3`);
    assert.ok(explainedVariance(x, recon, D) > 0.9);
  });
});

describe("sparsity.safetensors", () => {
  test("holds log10 of the firing frequency over the last window, as counted independently from each step's state", async () => {
    const dir = runDir();
    const [steps, window] = [12, 4];
    const sae = { name: "s", recipe: "topk", width: 96, k: 3, lr: 0.01 };
    const { result } = await train(
      dir,
      { steps, checkpointEvery: 1, keepCheckpoints: steps + 1, sparsityWindowTokens: window * ROWS, exportOnFinish: true, saes: [sae] },
      batches.slice(0, steps),
    );
    // Step t trains on batch t-1 with the state checkpointed at step t-1; count the reference code's firings.
    const spec = smallSpec({ batchSize: ROWS, dModel: D, width: 96, k: 3 });
    const fired = new Float64Array(96);
    for (let t = steps - window + 1; t <= steps; t++) {
      const before = finalState(dir, "s", 96, t - 1);
      const sc = { scale: before.meta.scale, lr: 0, t, sparsityCoef: 0, preActCoef: 0, k: 3, deadIdx: [], auxK: 0, auxScale: 0 };
      evaluate(spec, toParams64(before.state), data.batches[t - 1]!, sc).fires.forEach((f, i) => (fired[i]! += f));
    }
    const written = loadSaeLens(result.exports[0]!).sparsity!;
    assert.equal(written.length, 96);
    assert.deepEqual(Array.from(written), Array.from(logSparsity({ fired, tokens: window * ROWS })));
    assert.equal((loadSaeLens(result.exports[0]!).cfg.saeflow as { sparsity_tokens: number }).sparsity_tokens, window * ROWS);
  });
});

describe("reviving dead latents", () => {
  /**
   * Planted dead latents: encoder rows shrunk 1000x, so they never win a top-k slot on their own, nor
   * (jumprelu_trained) clear their thresholds. Returns how many fired again.
   */
  async function plantedRun(recipe: "topk" | "jumprelu_trained", coefficient: number): Promise<number> {
    const dir = runDir();
    const width = 96;
    const planted = Array.from({ length: 24 }, (_, i) => 72 + i);
    const scale = normalisationScale(data.batches.slice(0, 4), D);
    const state = initState(width, D, new Rng(1, "aux"), new Float32Array(D), { recipe });
    for (const i of planted) for (let j = 0; j < D; j++) state.W_enc[i * D + j]! *= 1e-3;
    const spec = {
      name: "sae",
      recipe,
      width,
      k: 3,
      lr: 0.01,
      l1Coefficient: 0,
      l1WarmupSteps: 0,
      ...(recipe === "topk" ? { auxKCoefficient: coefficient, kAux: 16 } : { preActLossCoefficient: coefficient }),
    };
    saveCheckpoint(
      join(dir, "sae", "checkpoints"),
      {
        meta: {
          step: 0,
          tokens: 0,
          rng: new Rng(1, "aux").state,
          scale,
          thresholdEma: 0,
          firedTokens: [0, 0],
          config: { sae: spec, dModel: D },
        },
        state,
        lastFired: new Float64Array(width),
        fired: [new Float64Array(width), new Float64Array(width)],
      },
      recipe,
      width,
      D,
      2,
    );
    const config = testConfig(dir, { batchSize: ROWS, steps: 400, deadWindowTokens: 5 * ROWS, saes: [spec] }, { dModel: D });
    const t = new Training({ config, source: new ArrayBatchSource(batches) });
    const { step } = await t.run();
    // Revived: fired on some token after planting (last_fired counts tokens; 0 is never).
    const { lastFired } = finalState(dir, "sae", width, step, recipe);
    return planted.filter((i) => lastFired[i]! > 0).length;
  }

  test("AuxK revives planted dead latents that stay dead without it", async (t) => {
    const revived = await plantedRun("topk", 1 / 32);
    const control = await plantedRun("topk", 0);
    t.diagnostic(`revived ${revived}/24 with AuxK, ${control}/24 without`);
    assert.equal(control, 0, "without AuxK nothing brings them back");
    assert.ok(revived >= 18, `AuxK revived ${revived}/24`);
  });

  test("jumprelu_trained's pre-activation loss revives planted dead latents that stay dead without it", async (t) => {
    const revived = await plantedRun("jumprelu_trained", 1e-3);
    const control = await plantedRun("jumprelu_trained", 0);
    t.diagnostic(`revived ${revived}/24 with the pre-activation loss, ${control}/24 without`);
    assert.equal(control, 0, "without it nothing brings them back");
    assert.ok(revived >= 18, `the pre-activation loss revived ${revived}/24`);
  });
});

describe("checkpoints", () => {
  test("an interrupted and resumed run ends bit-identical to an uninterrupted one", async () => {
    // k anneals over the first 60 steps, so the resumed run switches step graphs after the checkpoint it resumes from.
    const settings = {
      steps: 120,
      checkpointEvery: 40,
      deadWindowTokens: 10 * ROWS,
      kAnnealFraction: 0.5,
      gradClipNorm: 5,
      sparsityWindowTokens: 30 * ROWS,
      saes: [
        { name: "a", recipe: "topk", width: 96, k: 3, kStart: 24, lr: 0.01, kAux: 8 },
        { name: "b", recipe: "batchtopk", width: 64, k: 4, lr: 0.005 },
        { name: "c", recipe: "gated", width: 64, lr: 0.01, l1Coefficient: 5 },
        { name: "d", recipe: "matryoshka", width: 64, k: 4, kStart: 16, prefixes: [16, 32], lr: 0.005 },
        {
          name: "e",
          recipe: "jumprelu_trained",
          width: 64,
          lr: 0.01,
          l0WarmupSteps: 50,
          jumpreluSparsityLossMode: "tanh",
          preActLossCoefficient: 1e-3,
        },
      ],
    };
    const whole = runDir();
    await train(whole, settings, batches.slice(0, 120));
    const split = runDir();
    // The first process sees 70 batches (its stream ends: a crash after step 70 loses nothing the
    // checkpoint at 40 does not hold, so restart from 40 by dropping the final checkpoint).
    await train(split, settings, batches.slice(0, 70));
    for (const sae of ["a", "b", "c", "d", "e"]) {
      const dir = join(split, sae, "checkpoints");
      assert.deepEqual(checkpointSteps(dir), [40, 70]);
      rmSync(checkpointPath(dir, 70));
    }
    await train(split, settings, batches.slice(40, 120));
    const saes = [
      ["a", 96, "topk"],
      ["b", 64, "batchtopk"],
      ["c", 64, "gated"],
      ["d", 64, "matryoshka"],
      ["e", 64, "jumprelu_trained"],
    ] as const;
    for (const [sae, width, recipe] of saes) {
      const x = finalState(whole, sae, width, 120, recipe);
      const y = finalState(split, sae, width, 120, recipe);
      for (const s of stateOf(recipe)) {
        const [a, b] = [stateTensor(x.state, s), stateTensor(y.state, s)];
        assert.ok(
          Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength)),
          `${sae} ${s} differs`,
        );
      }
      assert.deepEqual(Array.from(y.lastFired), Array.from(x.lastFired));
      assert.deepEqual(
        y.fired.map((f) => Array.from(f)),
        x.fired.map((f) => Array.from(f)),
      );
      assert.deepEqual(y.meta, x.meta);
    }
  });

  /**
   * Ten good batches, then one of the wrong width, which ends the run with a ConfigError; `before`
   * runs just before that batch is handed out.
   */
  const failingAt10 = (before: () => void): BatchSource => {
    let served = 0;
    return {
      next: async () => {
        if (served < 10) return batches[served++];
        before();
        return { ...batches[0]!, dModel: D + 1 };
      },
      close: () => undefined,
    };
  };
  const failedRun = async (dir: string, source: BatchSource) => {
    const lines: string[] = [];
    const config = testConfig(
      dir,
      { batchSize: ROWS, steps: 50, saes: [{ name: "s", recipe: "topk", width: 96, k: 3, lr: 0.01 }] },
      { dModel: D },
    );
    await assert.rejects(
      new Training({ config, source, log: (line) => lines.push(line) }).run(),
      (err: unknown) => err instanceof ConfigError && err.keys[0] === "buffer.hookPoints.0.dModel",
      "the run ends with the error that stopped it, not the checkpoint's",
    );
    return lines;
  };

  test("a run that fails between steps checkpoints the step it reached", async () => {
    const dir = runDir();
    const lines = await failedRun(
      dir,
      failingAt10(() => undefined),
    );
    assert.deepEqual(checkpointSteps(join(dir, "s", "checkpoints")), [10]);
    assert.ok(!lines.some((l) => /failed/.test(l)), lines.join("\n"));
  });

  test("a checkpoint that fails after a failed run is logged, naming the SAEs, the step, the run folder and the error", async () => {
    const dir = runDir();
    // The checkpoint folder is a file by the time the run fails, so its last checkpoint cannot be written.
    const lines = await failedRun(
      dir,
      failingAt10(() => writeFileSync(join(dir, "s", "checkpoints"), "")),
    );
    const failed = lines.filter((l) => /checkpoint/.test(l) && /failed/.test(l));
    assert.equal(failed.length, 1, lines.join("\n"));
    assert.ok(failed[0]!.includes(`of s at step 10 in ${dir} failed: `), failed[0]);
    assert.match(failed[0]!, /EEXIST/);
  });

  test("a stray temporary file from a crash mid-write is ignored", async () => {
    const dir = runDir();
    const settings = { steps: 20, checkpointEvery: 10, saes: [{ name: "s", recipe: "topk", width: 96, k: 3, lr: 0.01 }] };
    await train(dir, settings, batches.slice(0, 10));
    const ckpts = join(dir, "s", "checkpoints");
    const { writeFileSync } = await import("node:fs");
    writeFileSync(`${checkpointPath(ckpts, 20)}.tmp-999`, Buffer.alloc(100, 7));
    assert.deepEqual(checkpointSteps(ckpts), [10]);
    const { result } = await train(dir, settings, batches.slice(10, 20));
    assert.equal(result.step, 20);
  });
});

describe("a sweep", () => {
  test("several SAEs train on one fp16 stream, each with its own metrics, checkpoints and export", async () => {
    const dir = runDir();
    const fp16 = data.batches
      .slice(0, 60)
      .map((x) => ({ data: Uint16Array.from(x, fp32ToFp16), dtype: "fp16" as const, rows: ROWS, dModel: D, traceparent: "" }));
    const saes = [
      { name: "k3", recipe: "topk", width: 96, k: 3, lr: 0.01 },
      { name: "k6-wide", recipe: "topk", width: 128, k: 6, lr: 0.005 },
      { name: "relu", recipe: "relu", width: 64, lr: 0.003, l1Coefficient: 1 },
    ];
    const { result } = await train(dir, { steps: 60, exportOnFinish: true, saes }, fp16);
    assert.equal(result.checkpoints.length, 3);
    assert.equal(result.exports.length, 3);
    for (const sae of saes) {
      const lines = readJsonl(join(dir, sae.name, "metrics.jsonl"));
      assert.ok(lines.length >= 2 && lines.every((l) => l.sae === sae.name));
      assert.ok((lines.at(-1)!.loss as number) < (lines[0]!.loss as number));
      const exp = loadSaeLens(join(dir, sae.name, "sae_lens"));
      assert.equal(exp.cfg.d_sae, sae.width);
      assert.equal(exp.cfg.architecture, sae.recipe === "relu" ? "standard" : "topk");
    }
  });
});
