import assert from "node:assert/strict";
import { describe, test } from "node:test";
import ort from "onnxruntime-node";
import { DataType, encodeModel, type ModelProto } from "../../services/producer/model/onnx.js";
import { Rng } from "../../services/trainer/rng.js";
import { crossEntropy, klAt, LSE, type Scored, withLogSumExp } from "../../tools/eval/score.js";
import { valueInfo } from "../../tools/model/builder.js";

/** log sum exp of each row, the textbook way, in float64. */
const rowLse = (logits: Float32Array, V: number): Float32Array =>
  Float32Array.from({ length: logits.length / V }, (_, p) => {
    const row = logits.subarray(p * V, (p + 1) * V);
    const max = row.reduce((m, v) => Math.max(m, v), -Infinity);
    return max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
  });

/** A model whose "logits" output is its input, at the given opset. */
const passThrough = (opset: number): ModelProto => ({
  irVersion: 8,
  opsetImport: [{ domain: "", version: opset }],
  graph: {
    name: "pass",
    node: [{ opType: "Identity", name: "/Identity", input: ["x"], output: ["logits"] }],
    input: [valueInfo("x", DataType.FLOAT, ["batch", "seq", "vocab"])],
    output: [valueInfo("logits", DataType.FLOAT, ["batch", "seq", "vocab"])],
  },
});

describe("next-token scores", () => {
  const rng = new Rng(9, "score");
  const V = 1000;
  const s = 3;
  const scored = (logits: Float32Array): Scored => ({ logits, lse: rowLse(logits, V) });
  const a = scored(Float32Array.from({ length: s * V }, () => 3 * rng.normal()));
  const b = scored(Float32Array.from(a.logits, (v) => v + 0.5 * rng.normal()));

  test("KL and cross-entropy agree with their definitions computed from the softmaxes", () => {
    for (let p = 0; p < s; p++) {
      let direct = 0;
      for (let v = p * V; v < (p + 1) * V; v++) {
        const logP = a.logits[v]! - a.lse[p]!;
        const logQ = b.logits[v]! - b.lse[p]!;
        direct += Math.exp(logP) * (logP - logQ);
      }
      const ours = klAt(a, b, p, V);
      assert.ok(Math.abs(ours - direct) < 1e-5 * Math.max(1, direct), `position ${p}: ${ours} vs ${direct}`);
      assert.equal(klAt(a, a, p, V), 0);
    }
    const ids = [5, 17, 999];
    const expected = [0, 1].reduce((sum, p) => sum - (a.logits[p * V + ids[p + 1]!]! - a.lse[p]!), 0);
    assert.ok(Math.abs(crossEntropy(a, ids, [0, 1], V) - expected) < 1e-9);
  });

  for (const opset of [14, 18]) {
    test(`the log-sum-exp output added to a model matches float64 and stays finite for large logits (opset ${opset})`, async () => {
      const session = await ort.InferenceSession.create(encodeModel(withLogSumExp(passThrough(opset))));
      try {
        const big = Float32Array.from(a.logits, (v, i) => (i < V ? v + 1000 : v));
        const out = await session.run({ x: new ort.Tensor("float32", big, [1, s, V]) });
        assert.deepEqual(out[LSE]!.dims, [1, s]);
        const ours = out[LSE]!.data as Float32Array;
        const expected = rowLse(big, V);
        for (let p = 0; p < s; p++)
          assert.ok(Math.abs(ours[p]! - expected[p]!) < 1e-4 * Math.abs(expected[p]!), `position ${p}: ${ours[p]} vs ${expected[p]}`);
      } finally {
        await session.release();
      }
    });
  }
});
