import assert from "node:assert/strict";
import { describe, test } from "node:test";
import ort from "onnxruntime-node";
import { fp32ToFp16, fp16ToFp32 } from "../../services/common/tensor-codec.js";
import { type JumpReluSpec, paramsOf, STAT, stateOf, type StepSpec } from "../../services/trainer/graph/step.js";
import { clipFactor, evaluate, referenceStep, type StepScalars, toParams64 } from "../../services/trainer/reference.js";
import { allocState, copyState, stateTensor } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { busyState, gaussianBatch, smallSpec } from "./fixtures.js";

const scalars = (over: Partial<StepScalars> = {}): StepScalars => ({
  scale: 1.3,
  lr: 1e-2,
  t: 1,
  sparsityCoef: 0.05,
  preActCoef: 0,
  k: 3,
  deadIdx: [],
  auxK: 0,
  auxScale: 0,
  ...over,
});

const auxK = { deadIdx: [1, 4, 5, 9, 14], auxK: 2, auxScale: 0.5 };
/** A bandwidth wide enough that some tokens of these small batches sit within it of each threshold. */
const jump = (over: Partial<JumpReluSpec> = {}): JumpReluSpec => ({
  bandwidth: 0.5,
  sparsityLoss: "step",
  tanhScale: 4,
  preActLoss: false,
  ...over,
});
const JUMP_CASES: Array<{ name: string; spec: StepSpec; sc: StepScalars }> = [
  { name: "jumprelu_trained, L0", spec: smallSpec({ recipe: "jumprelu_trained", jumpRelu: jump() }), sc: scalars({ sparsityCoef: 0.3 }) },
  {
    name: "jumprelu_trained, tanh penalty + pre-act loss, free decoder norms",
    spec: smallSpec({
      recipe: "jumprelu_trained",
      unitNormDecoder: false,
      jumpRelu: jump({ sparsityLoss: "tanh", tanhScale: 2, preActLoss: true }),
    }),
    sc: scalars({ sparsityCoef: 0.2, preActCoef: 0.3, deadIdx: [0, 1, 4, 5, 9, 14] }),
  },
  {
    name: "jumprelu_trained, L0 + pre-act loss, clipped",
    spec: smallSpec({ recipe: "jumprelu_trained", gradClipNorm: 0.05, jumpRelu: jump({ bandwidth: 0.3, preActLoss: true }) }),
    sc: scalars({ sparsityCoef: 0.1, preActCoef: 0.5, deadIdx: [0, 3, 7] }),
  },
];
const CASES: Array<{ name: string; spec: StepSpec; sc: StepScalars }> = [
  { name: "topk", spec: smallSpec(), sc: scalars() },
  { name: "topk + AuxK", spec: smallSpec({ auxK: true }), sc: scalars(auxK) },
  { name: "topk ranked by activation x decoder norm + AuxK", spec: smallSpec({ auxK: true, unitNormDecoder: false }), sc: scalars(auxK) },
  { name: "topk, k fed (annealing)", spec: smallSpec({ auxK: true, annealK: true, k: 6 }), sc: scalars({ ...auxK, k: 4 }) },
  { name: "topk, k fed, ranked by decoder norm", spec: smallSpec({ annealK: true, k: 6, unitNormDecoder: false }), sc: scalars({ k: 5 }) },
  {
    name: "batchtopk + AuxK",
    spec: smallSpec({ recipe: "batchtopk", auxK: true }),
    sc: scalars({ deadIdx: [0, 3, 7], auxK: 2, auxScale: 0.25 }),
  },
  { name: "batchtopk ranked by decoder norm", spec: smallSpec({ recipe: "batchtopk", unitNormDecoder: false }), sc: scalars() },
  { name: "batchtopk, k fed (annealing)", spec: smallSpec({ recipe: "batchtopk", annealK: true, k: 7 }), sc: scalars({ k: 5 }) },
  { name: "matryoshka + AuxK", spec: smallSpec({ recipe: "matryoshka", prefixes: [4, 10], auxK: true }), sc: scalars(auxK) },
  {
    name: "matryoshka ranked by decoder norm",
    spec: smallSpec({ recipe: "matryoshka", prefixes: [3, 6, 12], unitNormDecoder: false }),
    sc: scalars(),
  },
  {
    name: "matryoshka, k fed (annealing)",
    spec: smallSpec({ recipe: "matryoshka", prefixes: [5, 9], annealK: true, k: 8, unitNormDecoder: false }),
    sc: scalars({ k: 6 }),
  },
  { name: "relu + L1", spec: smallSpec({ recipe: "relu", unitNormDecoder: false }), sc: scalars() },
  { name: "gated", spec: smallSpec({ recipe: "gated" }), sc: scalars({ sparsityCoef: 0.2 }) },
  { name: "gated, free decoder norms", spec: smallSpec({ recipe: "gated", unitNormDecoder: false }), sc: scalars({ sparsityCoef: 0.2 }) },
  { name: "topk + gradient clipping", spec: smallSpec({ auxK: true, gradClipNorm: 0.05 }), sc: scalars(auxK) },
  ...JUMP_CASES,
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

const norm = (xs: ArrayLike<number>[]) => Math.sqrt(xs.reduce((a, x) => a + Array.from(x).reduce((b, v) => b + v * v, 0), 0));

describe("reference step", () => {
  for (const { name, spec, sc } of CASES) {
    test(`${name}: hand-derived gradients match central finite differences`, () => {
      const x = gaussianBatch(spec.batchSize, spec.dModel, name);
      const params = toParams64(busyState(spec, name), spec.recipe);
      const base = evaluate(spec, params, x, sc);
      // AuxK's target and gated's frozen decoder are constants to the gradient, so hold them fixed.
      const lossAt = () => evaluate(spec, params, x, sc, base.frozen).loss;
      const h = 1e-6;
      // theta's straight-through gradient is no derivative of the loss: its own test checks it against the formula.
      for (const p of paramsOf(spec.recipe).filter((q) => q !== "threshold")) {
        const values = params[p]!;
        for (let probe = 0; probe < Math.min(values.length, 24); probe++) {
          const i = (probe * 7919) % values.length;
          const keep = values[i]!;
          values[i] = keep + h;
          const up = lossAt();
          values[i] = keep - h;
          const down = lossAt();
          values[i] = keep;
          const fd = (up - down) / (2 * h);
          const g = base.grads[p]![i]!;
          assert.ok(Math.abs(fd - g) <= 1e-5 * Math.max(1, Math.abs(g)), `${p}[${i}]: finite difference ${fd}, gradient ${g}`);
        }
      }
      assert.ok(base.stats[STAT.sse]! > 0);
      if (spec.auxK || spec.recipe === "gated" || spec.jumpRelu?.preActLoss)
        assert.ok(base.stats[STAT.aux]! > 0, "the auxiliary term is live");
      if (["relu", "gated", "jumprelu_trained"].includes(spec.recipe))
        assert.ok(base.stats[STAT.penalty]! > 0, "the sparsity term is live");
      if (spec.recipe === "matryoshka") assert.ok(base.stats[STAT.prefix]! > base.stats[STAT.sse]!, "inner prefixes reconstruct worse");
    });
  }
});

/**
 * theta's gradient, from the formulas of Rajamanoharan et al. 2024 as SAELens writes them, computed
 * here from a forward pass of its own: with t = relu(theta) and K(u) = 1[|u| < 1/2],
 *   -(t_i / eps) sum_b K((pre_bi - t_i) / eps) dL/df_bi   (the jump's pseudo-derivative)
 *   -(lambda / (B eps)) sum_b K(...)                       (step mode's L0)
 * plus what is a true derivative, the pre-activation loss's, taken by central finite differences
 * (nothing else in the loss moves with theta unless a pre-activation crosses the threshold); all of
 * it zero where theta <= 0.
 */
function thresholdGradient(spec: StepSpec, params: ReturnType<typeof toParams64>, x: Float32Array, sc: StepScalars): Float64Array {
  const { batchSize: B, dModel: d, width: n } = spec;
  const { bandwidth: eps, sparsityLoss, tanhScale } = spec.jumpRelu!;
  const { W_enc, b_enc, W_dec, b_dec } = params;
  const theta = params.threshold!;
  const norms = Array.from({ length: n }, (_, i) => Math.hypot(...W_dec.subarray(i * d, (i + 1) * d)));
  const pre = (b: number, i: number) =>
    b_enc[i]! + Array.from({ length: d }, (_, j) => (x[b * d + j]! * sc.scale - b_dec[j]!) * W_enc[i * d + j]!).reduce((a, v) => a + v);
  const out = new Float64Array(n);
  for (let b = 0; b < B; b++) {
    const p = Array.from({ length: n }, (_, i) => pre(b, i));
    const f = p.map((v, i) => (v > Math.max(theta[i]!, 0) ? v : 0));
    const err = Array.from(
      { length: d },
      (_, j) => b_dec[j]! + f.reduce((a, v, i) => a + v * W_dec[i * d + j]!, 0) - x[b * d + j]! * sc.scale,
    );
    for (let i = 0; i < n; i++) {
      const t = Math.max(theta[i]!, 0);
      if (!(theta[i]! > 0) || !(Math.abs(p[i]! - t) < eps / 2)) continue;
      let dF = (2 / B) * err.reduce((a, e, j) => a + e * W_dec[i * d + j]!, 0);
      if (sparsityLoss === "tanh")
        dF += (sc.sparsityCoef / B) * tanhScale * norms[i]! * (1 - Math.tanh(tanhScale * f[i]! * norms[i]!) ** 2);
      out[i]! += -(t / eps) * dF - (sparsityLoss === "step" ? sc.sparsityCoef / (B * eps) : 0);
    }
  }
  const h = 1e-7;
  for (let i = 0; i < n; i++) {
    const keep = theta[i]!;
    theta[i] = keep + h;
    const up = evaluate(spec, params, x, sc).loss;
    theta[i] = keep - h;
    const down = evaluate(spec, params, x, sc).loss;
    theta[i] = keep;
    out[i]! += (up - down) / (2 * h);
  }
  return out;
}

describe("JumpReLU's threshold gradient", () => {
  for (const { name, spec, sc } of JUMP_CASES) {
    test(`${name}: the straight-through estimator for theta matches the formula, kernel width and all`, () => {
      const x = gaussianBatch(spec.batchSize, spec.dModel, name);
      const params = toParams64(busyState(spec, name), spec.recipe);
      const expected = thresholdGradient(spec, params, x, sc);
      const got = evaluate(spec, params, x, sc).grads.threshold!;
      for (let i = 0; i < spec.width; i++) {
        assert.ok(
          Math.abs(got[i]! - expected[i]!) <= 1e-6 * Math.max(1, Math.abs(expected[i]!)),
          `threshold[${i}]: ${got[i]} vs ${expected[i]}`,
        );
      }
      assert.equal(got[0], 0, "theta below zero: relu passes no gradient");
      assert.ok(got.filter((v) => v !== 0).length >= 3, "several thresholds have tokens within the kernel");
      // A kernel too narrow to hold any token leaves theta only the pre-activation loss's gradient.
      const narrow = { ...spec, jumpRelu: { ...spec.jumpRelu!, bandwidth: 1e-9 } };
      const still = evaluate(narrow, params, x, sc).grads.threshold!;
      const preActOnly = thresholdGradient(narrow, params, x, sc);
      for (let i = 0; i < spec.width; i++) assert.ok(Math.abs(still[i]! - preActOnly[i]!) <= 1e-6 * Math.max(1, Math.abs(preActOnly[i]!)));
      if (!spec.jumpRelu!.preActLoss)
        assert.ok(
          still.every((v) => v === 0),
          "and without it, none",
        );
    });
  }
});

describe("ONNX step graph", () => {
  for (const { name, spec, sc } of CASES) {
    test(`${name}: gradients, stats and fires match the reference`, async () => {
      const x = gaussianBatch(spec.batchSize, spec.dModel, name);
      const state = busyState(spec, name);
      const expected = evaluate(spec, toParams64(state, spec.recipe), x, sc);
      const clip = clipFactor(expected.stats[STAT.gradNorm]!, spec.gradClipNorm);
      const session = await StepSession.create({ ...spec, gradOutputs: true }, state, 1);
      const out = await session.run(new ort.Tensor("float32", x, [spec.batchSize, spec.dModel]), sc);
      for (const p of paramsOf(spec.recipe))
        assertClose(
          out.grads![p]!,
          expected.grads[p]!.map((v) => v * clip),
          1e-5,
          `grad ${p}`,
        );
      assertClose(out.stats, expected.stats, 1e-5, "stats");
      assert.deepEqual(Array.from(out.fires), Array.from(expected.fires));
      await session.close();
    });

    test(`${name}: five full steps (clipping, Adam, renormalisation) track the reference`, async () => {
      const state = busyState(spec, name);
      const ref = allocState(spec.width, spec.dModel, spec.recipe);
      copyState(state, ref, spec.recipe);
      const session = await StepSession.create(spec, state, 1);
      let refState = ref;
      for (let t = 1; t <= 5; t++) {
        const x = gaussianBatch(spec.batchSize, spec.dModel, `${name}/${t}`);
        const stepScalars = { ...sc, t };
        await session.run(new ort.Tensor("float32", x, [spec.batchSize, spec.dModel]), stepScalars);
        refState = referenceStep(spec, refState, x, stepScalars).next;
      }
      for (const s of stateOf(spec.recipe)) assertClose(stateTensor(session.state, s), stateTensor(refState, s), 2e-5, s);
      await session.close();
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
    assertClose(out.grads!.W_enc!, expected.grads.W_enc, 1e-5, "grad W_enc");
    assertClose(out.stats, expected.stats, 1e-5, "stats");
    await session.close();
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
    await session.close();
  });

  test("a graph refuses a k it was not built for", async () => {
    const x = new ort.Tensor("float32", gaussianBatch(8, 6, "k"), [8, 6]);
    const fixed = await StepSession.create(smallSpec(), busyState(smallSpec(), "k"), 1);
    await assert.rejects(fixed.run(x, scalars({ k: 4 })), /built for k 3/);
    await fixed.close();
    const fed = await StepSession.create(smallSpec({ annealK: true, k: 5 }), busyState(smallSpec(), "k"), 1);
    await assert.rejects(fed.run(x, scalars({ k: 6 })), /outside this step graph's range 1\.\.5/);
    await fed.close();
  });

  test("gradient clipping bounds what reaches Adam: the gradient's norm and so the first moment's", async () => {
    const clip = 0.05;
    const spec = smallSpec({ gradClipNorm: clip, gradOutputs: true });
    const clipped = await StepSession.create(spec, busyState(spec, "clip"), 1);
    const free = await StepSession.create({ ...spec, gradClipNorm: 0 }, busyState(spec, "clip"), 1);
    for (let t = 1; t <= 4; t++) {
      // Inputs 40x larger than the clip level's scale: unclipped gradients are far above it.
      const x = new ort.Tensor("float32", gaussianBatch(spec.batchSize, spec.dModel, `clip/${t}`, 40), [spec.batchSize, spec.dModel]);
      const a = await clipped.run(x, scalars({ t, scale: 1 }));
      const gradNorm = a.stats[STAT.gradNorm]!;
      assert.ok(gradNorm > 10 * clip, `the raw gradient norm ${gradNorm} is well above the clip level`);
      assert.ok(Math.abs(norm(Object.values(a.grads!)) - clip) < 1e-4 * clip, "the clipped gradient has norm = clip");
      const b = await free.run(x, scalars({ t, scale: 1 }));
      assert.ok(
        Math.abs(norm(Object.values(b.grads!)) - b.stats[STAT.gradNorm]!) < 1e-4 * gradNorm,
        "unclipped, Adam sees the raw gradient",
      );
      const moments = (s: StepSession) => norm(paramsOf("topk").map((p) => stateTensor(s.state, `m_${p}`)));
      // m_t = sum_s (1-b1) b1^(t-s) g_s, so |m_t| <= (1 - b1^t) clip.
      assert.ok(moments(clipped) <= (1 - 0.9 ** t) * clip * (1 + 1e-5), `|m_${t}| ${moments(clipped)}`);
      assert.ok(moments(free) > 10 * moments(clipped));
    }
    await clipped.close();
    await free.close();
  });
});
