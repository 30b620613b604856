import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type ExportInfo, exportSaeLens, hookLayer, loadSaeLens, SPARSITY_FILE } from "../../services/trainer/export.js";
import { evaluate, type StepScalars, toParams64 } from "../../services/trainer/reference.js";
import { hookConfig } from "../../services/trainer/hook.js";
import { SaeRun } from "../../services/trainer/sae-run.js";
import { loadSae, saeForward } from "../../tools/eval/sae.js";
import { busyState, gaussianBatch, saeLensForward, smallSpec, testConfig } from "./fixtures.js";

const spec = smallSpec({ batchSize: 16, dModel: 6, width: 16, k: 3 });
const { width: n, dModel: d } = spec;
const scale = 1.7;
const info = (over: Partial<ExportInfo>): ExportInfo => ({
  architecture: "topk",
  k: 3,
  scale,
  hookName: "blocks.12.hook_resid_post",
  modelName: "tiny-llama",
  contextSize: 128,
  prependBos: true,
  provenance: { recipe: "topk" },
  ...over,
});

const noStep: StepScalars = { scale, lr: 0, t: 1, sparsityCoef: 0, preActCoef: 0, k: 3, deadIdx: [], auxK: 0, auxScale: 0 };

/** What the trained SAE reconstructs from raw x: x_hat_norm / scale = (err + x_norm) / scale. */
const trainedRecon = (x: Float32Array, s: typeof spec, state: ReturnType<typeof busyState>) => {
  const { frozen } = evaluate(s, toParams64(state, s.recipe), x, noStep);
  return Float32Array.from(x, (v, i) => (frozen.err[i]! + v * scale) / scale);
};

function assertRecon(actual: Float32Array, expected: Float32Array, what: string): void {
  for (let i = 0; i < expected.length; i++) {
    assert.ok(
      Math.abs(actual[i]! - expected[i]!) < 1e-4 * Math.max(1, Math.abs(expected[i]!)),
      `${what} recon[${i}] ${actual[i]} vs ${expected[i]}`,
    );
  }
}

describe("SAELens export", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-export-"));
  after(() => rmSync(root, { recursive: true, force: true }));
  const state = busyState(spec, "export");

  test("reloads to the trained weights with the normalisation folded in, in SAELens' layout", () => {
    const dir = exportSaeLens(join(root, "topk"), state, n, d, info({}));
    const exp = loadSaeLens(dir);
    assert.deepEqual(exp.tensors.W_enc!.shape, [d, n]);
    assert.deepEqual(exp.tensors.W_dec!.shape, [n, d]);
    assert.deepEqual(exp.tensors.b_enc!.shape, [n]);
    assert.deepEqual(exp.tensors.b_dec!.shape, [d]);
    assert.equal(exp.tensors.threshold, undefined);
    const wEnc = exp.tensors.W_enc!.data as Float32Array;
    const wDec = exp.tensors.W_dec!.data as Float32Array;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < d; j++) {
        assert.equal(wEnc[j * n + i], Math.fround(state.W_enc[i * d + j]! * scale));
        assert.equal(wDec[i * d + j], Math.fround(state.W_dec[i * d + j]! / scale));
      }
    }
    assert.deepEqual(Array.from(exp.tensors.b_enc!.data as Float32Array), Array.from(state.b_enc));
    assert.deepEqual(
      Array.from(exp.tensors.b_dec!.data as Float32Array),
      Array.from(state.b_dec, (v) => Math.fround(v / scale)),
    );
    assert.deepEqual(readdirSync(root), ["topk"], "no temporary folder is left behind");
    assert.equal(exp.cfg.architecture, "topk");
  });

  test("cfg.json carries what SAELens needs to load and place the SAE", () => {
    const exp = loadSaeLens(exportSaeLens(join(root, "cfg"), state, n, d, info({})));
    assert.equal(exp.cfg.architecture, "topk");
    assert.equal(exp.cfg.d_in, d);
    assert.equal(exp.cfg.d_sae, n);
    assert.equal(exp.cfg.k, 3);
    assert.deepEqual(exp.cfg.activation_fn_kwargs, { k: 3 });
    assert.equal(exp.cfg.apply_b_dec_to_input, true);
    assert.equal(exp.cfg.normalize_activations, "none");
    assert.equal(exp.cfg.dtype, "float32");
    assert.equal(exp.cfg.device, "cpu");
    assert.equal(exp.cfg.hook_name, "blocks.12.hook_resid_post");
    assert.equal(exp.cfg.hook_layer, 12);
    assert.equal(exp.cfg.context_size, 128);
    assert.equal(exp.cfg.model_name, "tiny-llama");
    assert.equal(hookLayer("hook_embed"), 0);
  });

  test("the export on raw activations reconstructs what the trained SAE did on normalised ones", () => {
    const x = gaussianBatch(spec.batchSize, d, "raw", 3);
    const exp = loadSaeLens(exportSaeLens(join(root, "fwd"), state, n, d, info({})));
    assertRecon(saeLensForward(exp, x).recon, trainedRecon(x, spec, state), "topk");
  });

  test("free decoder norms are folded into the encoder: unit decoder rows, the same TopK ranking and reconstruction", () => {
    const free = smallSpec({ batchSize: 16, width: 16, k: 3, unitNormDecoder: false });
    const freeState = busyState(free, "free-norms");
    const x = gaussianBatch(free.batchSize, d, "free", 3);
    const exp = loadSaeLens(exportSaeLens(join(root, "fold"), freeState, n, d, info({ foldDecoderNorm: true })));
    const wDec = exp.tensors.W_dec!.data as Float32Array;
    for (let i = 0; i < n; i++)
      assert.ok(Math.abs(Math.hypot(...wDec.subarray(i * d, (i + 1) * d)) - 1 / scale) < 1e-6, `row ${i} has norm 1 (in raw units)`);
    assertRecon(saeLensForward(exp, x).recon, trainedRecon(x, free, freeState), "folded topk");
    const sae = loadSae(join(root, "fold"));
    assertRecon(saeForward(sae, x, free.batchSize).recon, trainedRecon(x, free, freeState), "tools/eval topk");
  });

  test("gated exports SAELens' layout (b_gate, r_mag, b_mag, no b_enc) and reconstructs as trained, folded or not", () => {
    for (const unitNormDecoder of [true, false]) {
      const gated = smallSpec({ recipe: "gated", batchSize: 16, width: 16, unitNormDecoder });
      const gatedState = busyState(gated, `gated-${unitNormDecoder}`);
      const x = gaussianBatch(gated.batchSize, d, "gated", 3);
      const dir = exportSaeLens(
        join(root, `gated-${unitNormDecoder}`),
        gatedState,
        n,
        d,
        info({ architecture: "gated", foldDecoderNorm: !unitNormDecoder }),
      );
      const exp = loadSaeLens(dir);
      assert.equal(exp.cfg.architecture, "gated");
      assert.equal(exp.cfg.activation_fn_str, "relu");
      assert.deepEqual(Object.keys(exp.tensors).sort(), ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]);
      for (const t of ["b_gate", "r_mag", "b_mag"]) assert.deepEqual(exp.tensors[t]!.shape, [n]);
      const expected = trainedRecon(x, gated, gatedState);
      const { codes } = saeLensForward(exp, x);
      assert.ok(codes.some((c) => c > 0) && codes.some((c, i) => c === 0 && i % n !== 0), "some latents gated on, some off");
      assertRecon(saeLensForward(exp, x).recon, expected, "gated");
      assertRecon(saeForward(loadSae(dir), x, gated.batchSize).recon, expected, "tools/eval gated");
    }
  });

  test("a trained JumpReLU exports relu(theta) as SAELens' threshold and runs as trained, decoder norms folded or not", () => {
    for (const unitNormDecoder of [true, false]) {
      const jump = smallSpec({ recipe: "jumprelu_trained", batchSize: 16, width: 16, unitNormDecoder });
      const jumpState = busyState(jump, `jump-${unitNormDecoder}`);
      const config = testConfig(
        join(root, "cfg-run"),
        {
          unitNormDecoder,
          ...(unitNormDecoder ? {} : { decoderInitNorm: 0.5 }),
          saes: [{ name: "jrt", recipe: "jumprelu_trained", width: n, jumpreluBandwidth: 0.2 }],
        },
        { dModel: d },
      );
      const cfg = hookConfig(config, config.trainer.hookPoints[0]!);
      const run = new SaeRun(config.trainer.saes[0]!, 0, join(root, `jrt-${unitNormDecoder}`), 5, cfg);
      const exportInfo = run.exportInfo(config, { step: 10, tokens: 160, scale }, jumpState);
      assert.equal(exportInfo.architecture, "jumprelu");
      assert.deepEqual(
        Array.from(exportInfo.threshold!),
        Array.from(jumpState.threshold!, (v) => Math.max(v, 0)),
      );
      assert.equal(exportInfo.provenance.jumprelu_bandwidth, 0.2);
      const dir = exportSaeLens(run.exportDir, jumpState, n, d, exportInfo);
      const exp = loadSaeLens(dir);
      assert.deepEqual(Object.keys(exp.tensors).sort(), ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]);
      assert.equal(exp.cfg.activation_fn_str, "relu");
      const x = gaussianBatch(jump.batchSize, d, "jump", 3);
      const expected = trainedRecon(x, jump, jumpState);
      const { codes } = saeLensForward(exp, x);
      assert.ok(codes.some((c) => c > 0) && codes.some((c) => c === 0), "some latents clear their thresholds, some do not");
      assertRecon(saeLensForward(exp, x).recon, expected, "jumprelu_trained");
      assertRecon(saeForward(loadSae(dir), x, jump.batchSize).recon, expected, "tools/eval jumprelu_trained");
    }
  });

  test("sparsity.safetensors holds SAELens' log10 firing frequency under the key sparsity", () => {
    const fired = Float64Array.from({ length: n }, (_, i) => (i % 4 === 0 ? 0 : i * 10));
    const exp = loadSaeLens(exportSaeLens(join(root, "sparsity"), state, n, d, info({ firing: { fired, tokens: 1000 } })));
    assert.ok(readdirSync(join(root, "sparsity")).includes(SPARSITY_FILE));
    assert.deepEqual(
      Array.from(exp.sparsity!),
      Array.from(fired, (f) => Math.fround(Math.log10(f / 1000 + 1e-10))),
    );
    assert.equal(exp.sparsity![0], Math.fround(-10), "a latent that never fired sits at log10(1e-10)");
    assert.equal(loadSaeLens(join(root, "topk")).sparsity, undefined, "no counts, no file");
  });

  test("JumpReLU and standard exports carry their threshold or none, and a re-export replaces the folder", () => {
    const threshold = Float32Array.from({ length: n }, (_, i) => 0.1 + i / 100);
    const dir = join(root, "jump");
    exportSaeLens(dir, state, n, d, info({ architecture: "standard" }));
    const exp = loadSaeLens(exportSaeLens(dir, state, n, d, info({ architecture: "jumprelu", threshold })));
    assert.equal(exp.cfg.architecture, "jumprelu");
    assert.equal(exp.cfg.k, undefined);
    assert.deepEqual(Array.from(exp.tensors.threshold!.data as Float32Array), Array.from(threshold));
    assert.throws(() => exportSaeLens(join(root, "bad"), state, n, d, info({ architecture: "jumprelu" })), /threshold/);
    assert.ok(!readdirSync(root).some((f) => f.startsWith("bad")), "a refused export writes nothing");
  });
});
