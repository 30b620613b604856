import assert from "node:assert/strict";
import { describe, test } from "node:test";
import ort from "onnxruntime-node";
import { fp32ToFp16, fp16ToFp32 } from "../../services/common/tensor-codec.js";
import { PARAMS, STAT, STATE, type StepSpec } from "../../services/trainer/graph/step.js";
import { evaluate, referenceStep, type StepScalars, toParams64 } from "../../services/trainer/reference.js";
import { copyState, allocState } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { busyState, gaussianBatch, smallSpec } from "./fixtures.js";

const scalars = (over: Partial<StepScalars> = {}): StepScalars => ({
  scale: 1.3,
  lr: 1e-2,
  t: 1,
  l1Coef: 0.05,
  deadIdx: [],
  auxK: 0,
  auxScale: 0,
  ...over,
});

const CASES: Array<{ name: string; spec: StepSpec; sc: StepScalars }> = [
  { name: "topk", spec: smallSpec(), sc: scalars() },
  { name: "topk + AuxK", spec: smallSpec({ auxK: true }), sc: scalars({ deadIdx: [1, 4, 5, 9, 14], auxK: 2, auxScale: 0.5 }) },
  { name: "batchtopk + AuxK", spec: smallSpec({ recipe: "batchtopk", auxK: true }), sc: scalars({ deadIdx: [0, 3, 7], auxK: 2, auxScale: 0.25 }) },
  { name: "relu + L1", spec: smallSpec({ recipe: "relu", unitNormDecoder: false }), sc: scalars() },
];

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  let scale = 0;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]!));
  for (let i = 0; i < expected.length; i++) {
    const diff = Math.abs(actual[i]! - expected[i]!);
    assert.ok(diff <= tol * Math.max(scale, 1e-3), `${what}[${i}]: ${actual[i]} vs ${expected[i]} (scale ${scale})`);
  }
}

describe("reference step", () => {
  for (const { name, spec, sc } of CASES) {
    test(`${name}: hand-derived gradients match central finite differences`, () => {
      const x = gaussianBatch(spec.batchSize, spec.dModel, name);
      const params = toParams64(busyState(spec, name));
      const base = evaluate(spec, params, x, sc);
      // AuxK's target (the main residual) is a constant to its gradient, so hold it fixed.
      const lossAt = () => evaluate(spec, params, x, sc, base.residual).loss;
      const h = 1e-6;
      for (const p of PARAMS) {
        const values = params[p];
        for (let probe = 0; probe < Math.min(values.length, 24); probe++) {
          const i = (probe * 7919) % values.length;
          const keep = values[i]!;
          values[i] = keep + h;
          const up = lossAt();
          values[i] = keep - h;
          const down = lossAt();
          values[i] = keep;
          const fd = (up - down) / (2 * h);
          const g = base.grads[p][i]!;
          assert.ok(Math.abs(fd - g) <= 1e-5 * Math.max(1, Math.abs(g)), `${p}[${i}]: finite difference ${fd}, gradient ${g}`);
        }
      }
      assert.ok(base.stats[STAT.sse]! > 0);
      if (spec.auxK) assert.ok(base.stats[STAT.aux]! > 0, "the AuxK term is live");
      if (spec.recipe === "relu") assert.ok(base.stats[STAT.penalty]! > 0, "the L1 term is live");
    });
  }
});

describe("ONNX step graph", () => {
  for (const { name, spec, sc } of CASES) {
    test(`${name}: gradients, stats and fires match the reference`, async () => {
      const x = gaussianBatch(spec.batchSize, spec.dModel, name);
      const state = busyState(spec, name);
      const expected = evaluate(spec, toParams64(state), x, sc);
      const session = await StepSession.create({ ...spec, gradOutputs: true }, state, 1);
      const out = await session.run(new ort.Tensor("float32", x, [spec.batchSize, spec.dModel]), sc);
      for (const p of PARAMS) assertClose(out.grads![p], expected.grads[p], 1e-5, `grad ${p}`);
      assertClose(out.stats, expected.stats, 1e-5, "stats");
      assert.deepEqual(Array.from(out.fires), Array.from(expected.fires));
      await session.release();
    });

    test(`${name}: five full steps (Adam, renormalisation) track the reference`, async () => {
      const state = busyState(spec, name);
      const ref = allocState(spec.width, spec.dModel);
      copyState(state, ref);
      const session = await StepSession.create(spec, state, 1);
      let refState = ref;
      for (let t = 1; t <= 5; t++) {
        const x = gaussianBatch(spec.batchSize, spec.dModel, `${name}/${t}`);
        const stepScalars = { ...sc, t };
        await session.run(new ort.Tensor("float32", x, [spec.batchSize, spec.dModel]), stepScalars);
        refState = referenceStep(spec, refState, x, stepScalars).next;
      }
      for (const s of STATE) assertClose(session.state[s], refState[s], 2e-5, s);
      await session.release();
    });
  }

  test("fp16 input is cast inside the graph", async () => {
    const spec = smallSpec({ input: "fp16" });
    const x = gaussianBatch(spec.batchSize, spec.dModel, "fp16");
    const words = Uint16Array.from(x, fp32ToFp16);
    const rounded = Float32Array.from(words, fp16ToFp32);
    const state = busyState(spec, "fp16");
    const expected = evaluate(spec, toParams64(state), rounded, scalars());
    const session = await StepSession.create({ ...spec, gradOutputs: true }, state, 1);
    const out = await session.run(new ort.Tensor("float16", words, [spec.batchSize, spec.dModel]), scalars());
    assertClose(out.grads!.W_enc, expected.grads.W_enc, 1e-5, "grad W_enc");
    assertClose(out.stats, expected.stats, 1e-5, "stats");
    await session.release();
  });

  test("steps write into the two preallocated state sets in turn", async () => {
    const spec = smallSpec();
    const state = busyState(spec, "swap");
    const first = state.W_enc;
    const session = await StepSession.create(spec, state, 1);
    const x = new ort.Tensor("float32", gaussianBatch(spec.batchSize, spec.dModel, "swap"), [spec.batchSize, spec.dModel]);
    await session.run(x, scalars());
    const second = session.state.W_enc;
    assert.notEqual(second, first);
    await session.run(x, scalars({ t: 2 }));
    assert.equal(session.state.W_enc, first, "the third state lands in the first set again");
    await session.release();
  });
});
