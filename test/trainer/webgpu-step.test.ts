import assert from "node:assert/strict";
import { describe, test } from "node:test";
import ort from "onnxruntime-node";
import { fp32ToBf16, fp32ToFp16 } from "../../services/common/tensor-codec.js";
import { halfWords } from "../../services/trainer/batches.js";
import { STAT, stateOf, type StepSpec } from "../../services/trainer/graph/step.js";
import type { StepScalars } from "../../services/trainer/reference.js";
import { copyState, allocState, type SaeState, stateTensor } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { busyState, gaussianBatch, smallSpec } from "./fixtures.js";
import { useSwiftShader, WEBGPU } from "./webgpu.js";

// Every recipe and schedule on WebGPU (SwiftShader) against the CPU provider, step by step: the same
// graph, the same state and batches. Adam's eps is 1e-4 here: with 1e-8, a gradient that cancels to
// ~1e-8 on one provider and ~1e-9 on the other (float rounding) moves its weight by a different
// fraction of lr, which says nothing about the graph. TOL is relative to each tensor's largest value.
useSwiftShader();
const STEPS = 12;
const TOL = 2e-4;

const aux = { deadIdx: [1, 4, 5, 9, 14], auxK: 2, auxScale: 0.5 };
const CASES: Array<{ name: string; spec: Partial<StepSpec>; sc?: Partial<StepScalars> }> = [
  { name: "topk + AuxK", spec: { auxK: true }, sc: aux },
  { name: "topk ranked by activation x decoder norm", spec: { auxK: true, unitNormDecoder: false }, sc: aux },
  { name: "topk while k anneals (k fed)", spec: { auxK: true, annealK: true, k: 6 }, sc: { ...aux, k: 4 } },
  { name: "batchtopk + AuxK", spec: { recipe: "batchtopk", auxK: true }, sc: aux },
  { name: "batchtopk while k anneals", spec: { recipe: "batchtopk", annealK: true, k: 7 }, sc: { k: 5 } },
  { name: "matryoshka + AuxK", spec: { recipe: "matryoshka", prefixes: [4, 10], auxK: true }, sc: aux },
  {
    name: "matryoshka while k anneals, free decoder norms",
    spec: { recipe: "matryoshka", prefixes: [5, 9], annealK: true, k: 8, unitNormDecoder: false },
    sc: { k: 6 },
  },
  { name: "relu + L1", spec: { recipe: "relu", unitNormDecoder: false } },
  { name: "gated", spec: { recipe: "gated" }, sc: { sparsityCoef: 0.2 } },
  { name: "topk + gradient clipping", spec: { auxK: true, gradClipNorm: 0.05 }, sc: aux },
  {
    name: "jumprelu_trained, L0 + pre-act loss",
    spec: { recipe: "jumprelu_trained", jumpRelu: { bandwidth: 0.5, sparsityLoss: "step", tanhScale: 4, preActLoss: true } },
    sc: { sparsityCoef: 0.1, preActCoef: 0.5, deadIdx: [0, 3, 7] },
  },
  {
    name: "jumprelu_trained, tanh penalty, free decoder norms",
    spec: {
      recipe: "jumprelu_trained",
      unitNormDecoder: false,
      jumpRelu: { bandwidth: 0.5, sparsityLoss: "tanh", tanhScale: 2, preActLoss: false },
    },
    sc: { sparsityCoef: 0.2 },
  },
];

const scalars = (t: number, over: Partial<StepScalars> = {}): StepScalars => ({
  scale: 1.3,
  lr: 1e-2,
  t,
  sparsityCoef: 0.05,
  preActCoef: 0,
  k: 3,
  deadIdx: [],
  auxK: 0,
  auxScale: 0,
  ...over,
});

function assertClose(actual: ArrayLike<number>, expected: ArrayLike<number>, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: length`);
  let scale = 1e-3;
  for (let i = 0; i < expected.length; i++) scale = Math.max(scale, Math.abs(expected[i]!));
  for (let i = 0; i < expected.length; i++) {
    assert.ok(
      Math.abs(actual[i]! - expected[i]!) <= TOL * scale,
      `${what}[${i}]: webgpu ${actual[i]}, cpu ${expected[i]} (scale ${scale})`,
    );
  }
}

const copied = (spec: StepSpec, state: SaeState): SaeState => {
  const out = allocState(spec.width, spec.dModel, spec.recipe);
  copyState(state, out, spec.recipe);
  return out;
};

describe("the step on WebGPU (SwiftShader) against the CPU", { timeout: 300_000 }, () => {
  for (const { name, spec: over, sc } of CASES) {
    test(`${name}: ${STEPS} steps agree, and the state stays on the device between them`, async () => {
      const spec = smallSpec({ ...over, eps: 1e-4, int32Index: true });
      const start = busyState(spec, name);
      const cpu = await StepSession.create(spec, copied(spec, start), 1);
      const gpu = await StepSession.create(spec, copied(spec, start), 1, WEBGPU);
      try {
        for (let t = 1; t <= STEPS; t++) {
          const x = new ort.Tensor("float32", gaussianBatch(spec.batchSize, spec.dModel, `${name}/${t}`), [spec.batchSize, spec.dModel]);
          const a = await cpu.run(x, scalars(t, sc));
          const stats = Float32Array.from(a.stats);
          const fires = Float32Array.from(a.fires);
          const b = await gpu.run(x, scalars(t, sc));
          assertClose(b.stats, stats, `step ${t} stats`);
          assertClose(b.fires, fires, `step ${t} fires`);
          for (const [s, where] of Object.entries(gpu.stateLocations()))
            assert.equal(where, "gpu-buffer", `step ${t}: ${s} left the device`);
          assert.throws(() => gpu.state, /on the device: read it with readState\(\)/);
        }
        const onDevice = await gpu.readState();
        for (const s of stateOf(spec.recipe)) assertClose(stateTensor(onDevice, s), stateTensor(cpu.state, s), s);
        assert.ok(Object.values(cpu.stateLocations()).every((where) => where === "cpu"));
      } finally {
        await cpu.close();
        await gpu.close();
      }
    });
  }

  test("bf16 batches widened on the device match the same rows widened on the host, bit for bit on the CPU", async () => {
    const base = smallSpec({ recipe: "matryoshka", prefixes: [4, 10], auxK: true, eps: 1e-4, int32Index: true });
    const rows = gaussianBatch(base.batchSize, base.dModel, "bf16");
    const words = Uint16Array.from(rows, fp32ToBf16);
    const batch = { data: words, dtype: "bf16" as const, rows: base.batchSize, dModel: base.dModel, traceparent: "" };
    const widened = new ort.Tensor(
      "float32",
      Float32Array.from(words, (w) => new Float32Array(Uint32Array.of(w << 16).buffer)[0]!),
      [base.batchSize, base.dModel],
    );
    const start = busyState(base, "bf16");
    const hostWide = await StepSession.create(base, copied(base, start), 1);
    const hostWords = await StepSession.create({ ...base, input: "bf16-words" }, copied(base, start), 1);
    const device = await StepSession.create({ ...base, input: "bf16-words" }, copied(base, start), 1, WEBGPU);
    try {
      for (let t = 1; t <= 3; t++) {
        const a = Float32Array.from((await hostWide.run(widened, scalars(t, aux))).stats);
        assert.ok(a[STAT.sse]! > 0);
        const b = Float32Array.from((await hostWords.run(halfWords(batch), scalars(t, aux))).stats);
        assert.deepEqual(Array.from(b), Array.from(a), "the in-graph widening is exact");
        assertClose((await device.run(halfWords(batch), scalars(t, aux))).stats, a, `step ${t} stats`);
      }
    } finally {
      await hostWide.close();
      await hostWords.close();
      await device.close();
    }
  });

  test("fp16 batches widened from word pairs on the device match the CPU's cast (SwiftShader has no shader-f16)", async () => {
    const spec = smallSpec({ input: "fp16", auxK: true, eps: 1e-4, int32Index: true });
    const words = Uint16Array.from(gaussianBatch(spec.batchSize, spec.dModel, "fp16"), fp32ToFp16);
    const batch = { data: words, dtype: "fp16" as const, rows: spec.batchSize, dModel: spec.dModel, traceparent: "" };
    const start = busyState(spec, "fp16");
    const cpu = await StepSession.create(spec, copied(spec, start), 1);
    const cpuWords = await StepSession.create({ ...spec, input: "fp16-words" }, copied(spec, start), 1);
    const gpu = await StepSession.create({ ...spec, input: "fp16-words" }, copied(spec, start), 1, WEBGPU);
    try {
      for (let t = 1; t <= 3; t++) {
        const a = Float32Array.from(
          (await cpu.run(new ort.Tensor("float16", words, [spec.batchSize, spec.dModel]), scalars(t, aux))).stats,
        );
        const b = Float32Array.from((await cpuWords.run(halfWords(batch), scalars(t, aux))).stats);
        assert.deepEqual(Array.from(b), Array.from(a), "the table widening is the cast, exactly");
        assertClose((await gpu.run(halfWords(batch), scalars(t, aux))).stats, a, `step ${t} stats`);
      }
    } finally {
      await cpu.close();
      await cpuWords.close();
      await gpu.close();
    }
  });

  test("int32 index arithmetic (kept on a GPU) gives the CPU's int64 results exactly", async () => {
    for (const over of [{}, { recipe: "batchtopk" as const, auxK: true }, { recipe: "matryoshka" as const, prefixes: [4, 10] }]) {
      const spec = smallSpec({ ...over, gradOutputs: true });
      const x = new ort.Tensor("float32", gaussianBatch(spec.batchSize, spec.dModel, "int32"), [spec.batchSize, spec.dModel]);
      const wide = await StepSession.create(spec, busyState(spec, "int32"), 1);
      const narrow = await StepSession.create({ ...spec, int32Index: true }, busyState(spec, "int32"), 1);
      const a = await wide.run(x, scalars(1, aux));
      const b = await narrow.run(x, scalars(1, aux));
      assert.deepEqual(Array.from(b.stats), Array.from(a.stats));
      assert.deepEqual(Array.from(b.grads!.W_dec!), Array.from(a.grads!.W_dec!));
      assert.deepEqual(Array.from(b.fires), Array.from(a.fires));
      await wide.close();
      await narrow.close();
    }
  });
});
