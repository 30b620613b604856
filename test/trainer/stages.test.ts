import assert from "node:assert/strict";
import { describe, test } from "node:test";
import onnxProto from "onnx-proto";
import ort from "onnxruntime-node";
import { F32, GraphBuilder, I64 } from "../../services/trainer/graph/builder.js";
import { buildStepStages, paramsOf, stateOf, type StepSpec } from "../../services/trainer/graph/step.js";
import { copyState, allocState, type SaeState, stateTensor } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { busyState, gaussianBatch, smallSpec } from "./fixtures.js";

// onnxruntime's CPU ScatterND with reduction "add" spreads its rows over the intra-op threads with
// nothing between two threads that add to the same row, so a repeated row can lose an add. The step
// graphs build every scatter-add over rows that may repeat in one-thread stages; these tests check
// the cut, and that a step on two threads gives what it gives on one.

const nodesOf = (model: Uint8Array) => onnxProto.onnx.ModelProto.decode(model).graph!.node!;

describe("step graphs cut into stages for the CPU", () => {
  test("a scatter-add over rows that may repeat outside a one-thread region is refused when the graph is built", () => {
    const g = new GraphBuilder("bad");
    const rows = g.input("rows", I64, [4, 1]);
    const updates = g.input("updates", F32, [4, 2]);
    assert.throws(
      () => g.scatterAdd(g.zeros([3, 2]), rows, updates, "g_x"),
      /scatter-add over rows that may repeat \(g_x\) must be built inside serially\(\)/,
    );
    assert.doesNotThrow(() => g.scatterAdd(g.zeros([3, 2]), rows, updates, "unique_rows", { unique: true }));
  });

  const SPARSE: Array<[string, Partial<StepSpec>]> = [
    ["topk + AuxK", { auxK: true }],
    ["batchtopk + AuxK", { recipe: "batchtopk", auxK: true }],
    ["matryoshka", { recipe: "matryoshka", prefixes: [4, 10] }],
  ];

  test("the sparse codes' scatter-adds run in one-thread stages, and only small tensors cross between stages", () => {
    for (const [name, over] of SPARSE) {
      const spec = smallSpec(over);
      const stages = buildStepStages(spec)!;
      assert.ok(stages.length >= 3, `${name}: ${stages.length} stages`);
      stages.forEach((stage, i) => assert.equal(stage.serial, i % 2 === 1, `${name}: stages alternate`));
      for (const [i, stage] of stages.entries()) {
        const scatters = nodesOf(stage.model).filter((n) => n.opType === "ScatterND");
        // In a stage on every thread only AuxK's adds remain, over the dead latents, which are distinct.
        if (!stage.serial)
          assert.ok(
            scatters.every((n) => n.output![0]!.endsWith("_aux")),
            `${name} stage ${i}: ${scatters.map((n) => n.name)}`,
          );
      }
      const serialScatters = stages.filter((s) => s.serial).flatMap((s) => nodesOf(s.model).filter((n) => n.opType === "ScatterND"));
      assert.ok(serialScatters.some((n) => n.output![0] === "g_W_dec") && serialScatters.some((n) => n.output![0] === "fires"), name);
      // What a stage hands on is never one of the [B, k, d] (or [B*k, d]) update tensors.
      const handed = stages.flatMap((s) => s.outputs.filter((o) => !/^(next_|stats$|fires$)/.test(o)));
      assert.ok(!handed.some((o) => /w_dec_sel|^mul/.test(o)), `${name} hands on ${handed.join(", ")}`);
    }
    for (const recipe of ["relu", "gated", "jumprelu_trained"] as const)
      assert.equal(buildStepStages(smallSpec({ recipe })), undefined, recipe);
    assert.equal(buildStepStages(smallSpec({ annealK: true, k: 6 })), undefined, "the dense graph fed k scatters nothing");
  });

  const copied = (spec: StepSpec, state: SaeState): SaeState => {
    const out = allocState(spec.width, spec.dModel, spec.recipe);
    copyState(state, out, spec.recipe);
    return out;
  };

  test("the step on two threads (staged) gives the step on one (whole) bit for bit, run after run", async () => {
    const aux = { deadIdx: [1, 4, 5, 9, 40], auxK: 2, auxScale: 0.5 };
    for (const [name, over] of SPARSE) {
      // Wide enough that each latent is kept by dozens of tokens: repeated rows in every scatter.
      const spec = smallSpec({
        ...over,
        batchSize: 512,
        dModel: 64,
        width: 64,
        k: 8,
        prefixes: over.prefixes ? [16, 32] : [],
        gradOutputs: true,
      });
      const start = busyState(spec, name);
      const one = await StepSession.create(spec, copied(spec, start), 1);
      const two = await StepSession.create(spec, copied(spec, start), 2);
      try {
        for (let t = 1; t <= 3; t++) {
          const x = new ort.Tensor("float32", gaussianBatch(spec.batchSize, spec.dModel, `${name}/${t}`), [spec.batchSize, spec.dModel]);
          const sc = {
            scale: 1.3,
            lr: 1e-2,
            t,
            sparsityCoef: 0,
            preActCoef: 0,
            k: 8,
            auxK: 0,
            auxScale: 0,
            deadIdx: [] as number[],
            ...(spec.auxK ? aux : {}),
          };
          const a = await one.run(x, sc);
          const [stats, fires] = [Array.from(a.stats), Array.from(a.fires)];
          const grads = Object.fromEntries(paramsOf(spec.recipe).map((p) => [p, Array.from(a.grads![p]!)]));
          const b = await two.run(x, sc);
          assert.deepEqual(Array.from(b.stats), stats, `${name} step ${t}: stats`);
          assert.deepEqual(Array.from(b.fires), fires, `${name} step ${t}: fires`);
          for (const p of paramsOf(spec.recipe)) assert.deepEqual(Array.from(b.grads![p]!), grads[p], `${name} step ${t}: grad ${p}`);
        }
        for (const s of stateOf(spec.recipe))
          assert.deepEqual(Array.from(stateTensor(two.state, s)), Array.from(stateTensor(one.state, s)), `${name}: ${s}`);
      } finally {
        await one.close();
        await two.close();
      }
    }
  });
});
