import { writeSync } from "node:fs";
import ort from "onnxruntime-node";
import { ortDeviceSessionOptions } from "../../services/common/ort.js";
import { buildCalibrateGraph } from "../../services/trainer/graph/calibrate.js";
import { buildStepGraph, nextName, stateOf } from "../../services/trainer/graph/step.js";
import { buildCopyGraph } from "../../services/trainer/graph/transfer.js";
import { smallSpec } from "./fixtures.js";
import { CASES } from "./placement-cases.js";
import { WEBGPU } from "./webgpu.js";

/**
 * Opens every graph the trainer runs, on WebGPU, with onnxruntime's verbose log, which lists where
 * each node was placed. Writes `== <case>` on stderr before each, so that placement.test.ts can tell
 * the logs apart. Run by that test with SwiftShader's environment.
 */

const mark = (name: string) => writeSync(2, `\n== ${name}\n`);

async function open(name: string, graph: Uint8Array, outputs: Record<string, "gpu-buffer" | "cpu">): Promise<void> {
  mark(name);
  const session = await ort.InferenceSession.create(graph, { ...ortDeviceSessionOptions(WEBGPU, outputs), logSeverityLevel: 0 });
  await session.release();
}

for (const [name, over] of Object.entries(CASES)) {
  const spec = smallSpec({ ...over, int32Index: true });
  const outputs = Object.fromEntries(stateOf(spec.recipe).map((s) => [nextName(s), "gpu-buffer" as const]));
  await open(`step: ${name}`, buildStepGraph(spec), outputs);
}
await open("copy: gated", buildCopyGraph("gated", 16, 6), {});
await open("copy: jumprelu_trained", buildCopyGraph("jumprelu_trained", 16, 6), {});
await open("calibrate", buildCalibrateGraph({ batchSize: 8, dModel: 6, width: 16, k: 3, input: "fp32" }), {});
mark("done");
