import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type ExportInfo, exportSaeLens, hookLayer, loadSaeLens } from "../../services/trainer/export.js";
import { evaluate, toParams64 } from "../../services/trainer/reference.js";
import { busyState, gaussianBatch, saeLensForward, smallSpec } from "./fixtures.js";

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
    assert.deepEqual(Array.from(exp.tensors.b_dec!.data as Float32Array), Array.from(state.b_dec, (v) => Math.fround(v / scale)));
    assert.deepEqual(readdirSync(root), ["topk"], "no temporary folder is left behind");
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
    const trained = evaluate(spec, toParams64(state), x, { scale, lr: 0, t: 1, l1Coef: 0, deadIdx: [], auxK: 0, auxScale: 0 });
    const exp = loadSaeLens(exportSaeLens(join(root, "fwd"), state, n, d, info({})));
    const { recon } = saeLensForward(exp, x);
    for (let i = 0; i < x.length; i++) {
      // x_hat_raw = x_hat_norm / scale = (err + x_norm) / scale.
      const expected = (trained.residual.err[i]! + x[i]! * scale) / scale;
      assert.ok(Math.abs(recon[i]! - expected) < 1e-4 * Math.max(1, Math.abs(expected)), `recon[${i}] ${recon[i]} vs ${expected}`);
    }
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
