import { dirname } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { modelLayout } from "../../services/producer/model/hooks.js";
import { loadModel } from "../../services/producer/model/onnx.js";
import { suffixFromHook, truncateAtHooks } from "../../services/producer/model/truncate.js";
import { checkSuffix, checkTruncation } from "./check.js";
import { saveModel } from "./save.js";

/**
 * Rewrites an exported model at hook points.
 *
 *   npx tsx tools/model/rewrite.ts --model IN --hooks blocks.0.hook_resid_post,blocks.1.hook_mlp_out --out OUT [--check]
 *     keeps only what the hook tensors need and makes them the outputs, named by hook;
 *   npx tsx tools/model/rewrite.ts --model IN --suffix blocks.1.hook_resid_pre --out OUT [--check]
 *     the model from that hook on (hook tensor in, logits out); --hooks adds further cut inputs.
 *
 * --check runs original and rewritten models in onnxruntime on a sample batch and fails unless the
 * tensors (or, for --suffix, the logits of prefix → suffix) are identical.
 */

const list = (raw: string | undefined): string[] =>
  (raw ?? "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean);

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      model: { type: "string" },
      hooks: { type: "string" },
      suffix: { type: "string" },
      out: { type: "string" },
      check: { type: "boolean", default: false },
    },
  });
  if (!values.model || !values.out)
    throw new Error("usage: rewrite.ts --model IN (--hooks a,b | --suffix HOOK [--hooks c]) --out OUT [--check]");
  const modelPath = values.model;
  const original = loadModel(modelPath);
  console.log(`${modelPath}: read as a ${modelLayout(original.graph ?? {}).families} export`);
  const hooks = list(values.hooks);
  const cut = values.suffix;
  const rewritten = cut === undefined ? truncateAtHooks(original, hooks) : suffixFromHook(original, cut, hooks);
  saveModel(rewritten, values.out, dirname(modelPath));
  const nodes = (m: typeof original) => m.graph?.node?.length ?? 0;
  console.log(`${values.out}: ${nodes(rewritten)} of ${nodes(original)} nodes`);
  if (!values.check) return;
  if (cut === undefined) {
    const diffs = await checkTruncation(modelPath, rewritten, hooks);
    for (const [hook, diff] of Object.entries(diffs)) console.log(`  ${hook}: max abs diff ${diff}`);
    if (Object.values(diffs).some((d) => d !== 0))
      throw new Error("check failed: the rewritten model's tensors differ from the original's");
  } else {
    const diff = await checkSuffix(modelPath, truncateAtHooks(original, [cut, ...hooks]), rewritten);
    console.log(`  logits through ${cut}: max abs diff ${diff}`);
    if (diff !== 0) throw new Error("check failed: prefix → suffix logits differ from the original's");
  }
  console.log("check passed");
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main().catch((err: unknown) => {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  });
}
