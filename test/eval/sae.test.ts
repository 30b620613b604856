import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { exportSaeLens, loadSaeLens } from "../../services/trainer/export.js";
import { Rng } from "../../services/trainer/rng.js";
import { allocState, initState, type SaeState } from "../../services/trainer/sae.js";
import { loadSae, SaeFolderError, saeForward } from "../../tools/eval/sae.js";
import { saeLensForward } from "../trainer/fixtures.js";
import { writeSae } from "./fixtures.js";

/**
 * d = 2, n = 4, b_dec = [0.5, 0] (subtracted before the encoder, added after the decoder).
 * Row 1: x = [1.5, 2], centred [1, 2], pre = [1, 2, 2.5, -1].
 * Row 2: x = [0.5, -1], centred [0, -1], pre = [0, -1, -1.5, 0].
 */
const hook = "blocks.0.hook_resid_post";
const x = Float32Array.of(1.5, 2, 0.5, -1);
const fill = (s: SaeState) => {
  s.W_enc.set([1, 0, 0, 1, 1, 1, -1, 0]);
  s.b_enc.set([0, 0, -0.5, 0]);
  s.W_dec.set([1, 0, 0, 1, 0.5, 0.5, 2, 2]);
  s.b_dec.set([0.5, 0]);
};

/** A gated export written by the trainer's exporter (b_enc becomes b_gate). */
function writeGated(dir: string, n: number, d: number, fill: (s: SaeState) => void): string {
  const state = allocState(n, d, "gated");
  fill(state);
  const info = {
    architecture: "gated" as const,
    k: 1,
    scale: 1,
    hookName: hook,
    modelName: "tiny-llama",
    contextSize: 32,
    prependBos: true,
    provenance: {},
  };
  return exportSaeLens(dir, state, n, d, info);
}

describe("SAE forward on an SAELens export", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-eval-sae-"));
  after(() => rmSync(root, { recursive: true, force: true }));

  test("standard: relu of every pre-activation", () => {
    const sae = loadSae(writeSae(join(root, "relu"), { hook, n: 4, d: 2, fill }));
    const { recon, l0 } = saeForward(sae, x, 2);
    // Row 1 codes [1, 2, 2.5, 0]: [0.5, 0] + [1, 0] + [0, 2] + [1.25, 1.25].
    assert.deepEqual(Array.from(recon), [2.75, 3.25, 0.5, 0]);
    assert.deepEqual(Array.from(l0), [3, 0]);
  });

  test("topk: the k largest pre-activations, then relu (k read from cfg.json)", () => {
    const sae = loadSae(writeSae(join(root, "topk"), { hook, n: 4, d: 2, architecture: "topk", k: 2, fill }));
    assert.equal(sae.k, 2);
    const { recon, l0 } = saeForward(sae, x, 2);
    // Row 1 keeps latents 2 (2.5) and 1 (2): [0.5, 0] + 2 * [0, 1] + 2.5 * [0.5, 0.5].
    // Row 2's top two are the zeros of latents 0 and 3, which relu leaves inactive.
    assert.deepEqual(Array.from(recon), [1.75, 3.25, 0.5, 0]);
    assert.deepEqual(Array.from(l0), [2, 0]);
  });

  test("jumprelu: pre-activations above their latent's threshold", () => {
    const threshold = Float32Array.of(0.5, 2.1, 1, 0.5);
    const sae = loadSae(writeSae(join(root, "jumprelu"), { hook, n: 4, d: 2, architecture: "jumprelu", threshold, fill }));
    const { recon, l0 } = saeForward(sae, x, 2);
    // Row 1 keeps latents 0 (1 > 0.5) and 2 (2.5 > 1), not 1 (2 <= 2.1): [0.5, 0] + [1, 0] + [1.25, 1.25].
    assert.deepEqual(Array.from(recon), [2.75, 1.25, 0.5, 0]);
    assert.deepEqual(Array.from(l0), [2, 0]);
  });

  test("gated: the gate (b_gate) picks latents, the magnitude path (exp(r_mag), b_mag) sizes them", () => {
    const sae = loadSae(
      writeGated(join(root, "gated"), 4, 2, (s) => {
        fill(s);
        s.r_mag!.set([0, Math.log(2), 0, 0]);
        s.b_mag!.set([0.5, 0, -3, 0]);
      }),
    );
    assert.equal(sae.architecture, "gated");
    const { recon, l0 } = saeForward(sae, x, 2);
    // Row 1: x_cent @ W_enc = [1, 2, 3, -1], gate [1, 2, 2.5, -1] opens 0, 1, 2; magnitudes [1.5, 4, 0]:
    // [0.5, 0] + 1.5 * [1, 0] + 4 * [0, 1]. Row 2: gate [0, -1, -1.5, 0] opens none.
    assert.deepEqual(Array.from(recon), [2, 4, 0.5, 0]);
    assert.deepEqual(Array.from(l0), [2, 0]);
  });

  test("matches the float64 SAELens forward the trainer's export is tested with, on random weights", () => {
    const d = 16;
    const n = 96;
    const rng = new Rng(5, "eval-sae");
    const rows = 12;
    const input = Float32Array.from({ length: rows * d }, () => rng.normal());
    for (const architecture of ["standard", "topk", "jumprelu", "gated"] as const) {
      const fillRandom = (s: SaeState) => {
        const init = initState(
          n,
          d,
          rng,
          Float32Array.from({ length: d }, () => 0.1 * rng.normal()),
        );
        s.W_enc.set(init.W_enc.map((v) => v + 0.1 * rng.normal()));
        s.W_dec.set(init.W_dec);
        s.b_dec.set(init.b_dec);
        s.b_enc.set(Float32Array.from({ length: n }, () => 0.05 * rng.normal()));
        s.r_mag?.set(Float32Array.from({ length: n }, () => 0.3 * rng.normal()));
        s.b_mag?.set(Float32Array.from({ length: n }, () => 0.05 * rng.normal()));
      };
      const dir =
        architecture === "gated"
          ? writeGated(join(root, "random-gated"), n, d, fillRandom)
          : writeSae(join(root, `random-${architecture}`), {
              hook,
              n,
              d,
              architecture,
              k: 7,
              threshold: Float32Array.from({ length: n }, () => 0.3 * rng.uniform()),
              fill: fillRandom,
            });
      const ours = saeForward(loadSae(dir), input, rows);
      const reference = saeLensForward(loadSaeLens(dir), input);
      const worst = ours.recon.reduce((m, v, i) => Math.max(m, Math.abs(v - reference.recon[i]!)), 0);
      assert.ok(worst < 1e-5, `${architecture}: max |difference| ${worst}`);
      for (let r = 0; r < rows; r++) {
        const active = reference.codes.subarray(r * n, (r + 1) * n).filter((c) => c > 0).length;
        assert.equal(ours.l0[r], active, `${architecture} row ${r}`);
      }
    }
  });

  test("a folder that is not a usable export is refused with what is wrong", () => {
    mkdirSync(join(root, "empty"));
    assert.throws(
      () => loadSae(join(root, "empty")),
      (err: Error) => err instanceof SaeFolderError && /no cfg\.json/.test(err.message),
    );
    assert.throws(
      () => loadSae(writeSae(join(root, "big-k"), { hook, n: 4, d: 2, architecture: "topk", k: 5, fill })),
      (err: Error) => err instanceof SaeFolderError && /k between 1 and d_sae \(4\), got 5/.test(err.message),
    );
  });
});
