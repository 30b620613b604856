import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { Rng } from "../../services/trainer/rng.js";
import { initialBDec, initState, normalisationScale } from "../../services/trainer/sae.js";
import { gaussianBatch } from "./fixtures.js";

describe("SAE initialisation", () => {
  const d = 8;

  test("the normalisation gives rows an average norm of sqrt(d)", () => {
    const batches = [gaussianBatch(64, d, "a", 7), gaussianBatch(64, d, "b", 7)];
    const scale = normalisationScale(batches, d);
    let sum = 0;
    for (const x of batches) {
      for (let r = 0; r < 64; r++) {
        let sq = 0;
        for (let j = 0; j < d; j++) sq += (x[r * d + j]! * scale) ** 2;
        sum += Math.sqrt(sq);
      }
    }
    assert.ok(Math.abs(sum / 128 - Math.sqrt(d)) < 1e-9);
  });

  test("b_dec starts at the mean, the geometric median, or zero, in normalised units", () => {
    // 90 rows around +1 and 10 far outliers: the median stays with the bulk, the mean does not.
    const x = new Float32Array(100 * d);
    const rng = new Rng(0, "median");
    for (let r = 0; r < 100; r++) for (let j = 0; j < d; j++) x[r * d + j] = r < 90 ? 1 + 0.1 * rng.normal() : 50;
    const mean = initialBDec([x], d, 2, "mean");
    const median = initialBDec([x], d, 2, "geometric_median");
    assert.ok(Math.abs(mean[0]! - 2 * (0.9 * 1 + 0.1 * 50)) < 0.1);
    assert.ok(Math.abs(median[0]! - 2) < 0.1, `median ${median[0]}`);
    assert.deepEqual(Array.from(initialBDec([x], d, 2, "zeros")), new Array(d).fill(0));
  });

  test("a seed and an SAE name fix the initial weights: unit decoder rows, encoder = decoder", () => {
    const a = initState(16, d, new Rng(3, "sae"), new Float32Array(d));
    const b = initState(16, d, new Rng(3, "sae"), new Float32Array(d));
    const c = initState(16, d, new Rng(3, "other"), new Float32Array(d));
    assert.deepEqual(a.W_dec, b.W_dec);
    assert.notDeepEqual(a.W_dec, c.W_dec);
    assert.deepEqual(a.W_enc, a.W_dec);
    for (let i = 0; i < 16; i++) {
      const norm = Math.hypot(...a.W_dec.subarray(i * d, (i + 1) * d));
      assert.ok(Math.abs(norm - 1) < 1e-6);
    }
    assert.ok(a.m_W_enc.every((v) => v === 0) && a.b_enc.every((v) => v === 0));
  });

  test("the generator resumes from its saved state", () => {
    const rng = new Rng(1, "r");
    rng.uint32();
    const copy = Rng.fromState(rng.state);
    assert.deepEqual([rng.uint32(), rng.normal()], [copy.uint32(), copy.normal()]);
  });
});
