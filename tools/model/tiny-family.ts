import { existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { buildDecoderModel, DECODER_GRAPH_VERSION } from "./decoder-graph.js";
import { type DecoderWeights, makeDecoderWeights } from "./decoder-weights.js";
import { familyConfig } from "./family-config.js";
import { type DecoderParams, FAMILIES, FAMILY_NAMES, type FamilyName, tinyParams } from "./families.js";
import { saveModel } from "./save.js";
import { makeTokenizerFiles } from "./tokenizer-files.js";

/**
 * A tiny model of one supported family (GPT-2, GPT-NeoX, Gemma 2, Qwen2, Mistral): its real
 * architecture at toy width with seeded weights, generated into a folder laid out like an optimum
 * export (model.onnx, config.json with the family's model_type and fields, tokenizer.json,
 * tokenizer_config.json). Tests use these, since no model can be downloaded.
 *
 *   npx tsx tools/model/tiny-family.ts --family gemma2 --out .cache/tiny-gemma2 [--seed 0]
 */

export interface TinyFamilyOptions {
  family: FamilyName;
  out: string;
  overrides?: Partial<Omit<DecoderParams, "family" | "vocabSize">>;
}

export interface TinyFamily {
  dir: string;
  modelPath: string;
  params: DecoderParams;
  /** Token ids of the tokenizer's special tokens and merges, by content. */
  ids: Record<string, number>;
  /** False when the folder already held this model. */
  generated: boolean;
  weights(): DecoderWeights;
}

const TOOL = "tools/model/tiny-family.ts";

function generatorRecord(dir: string): unknown {
  try {
    return (JSON.parse(readFileSync(join(dir, "config.json"), "utf8")) as { saeflow_generator?: unknown }).saeflow_generator;
  } catch {
    return undefined;
  }
}

const json = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

export function makeTinyFamily(options: TinyFamilyOptions): TinyFamily {
  const { family, out, overrides = {} } = options;
  const tokenizer = makeTokenizerFiles(FAMILIES[family].tokenizer);
  const params = tinyParams(family, tokenizer.vocabSize, overrides);
  const dir = resolve(out);
  const modelPath = join(dir, "model.onnx");
  const record = { tool: TOOL, graphVersion: DECODER_GRAPH_VERSION, ...params };
  const result = (generated: boolean): TinyFamily => ({
    dir,
    modelPath,
    params,
    ids: tokenizer.ids,
    generated,
    weights: () => makeDecoderWeights(params),
  });
  const same = () => existsSync(modelPath) && JSON.stringify(generatorRecord(dir)) === JSON.stringify(record);
  if (same()) return result(false);
  if (existsSync(dir) && generatorRecord(dir) === undefined) {
    throw new Error(`${dir} exists and was not written by ${TOOL}; choose another --out`);
  }
  // Written into a sibling folder and renamed, so a reader never sees a half-written model.
  const staging = `${dir}.tmp-${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  mkdirSync(staging, { recursive: true });
  saveModel(buildDecoderModel(params, makeDecoderWeights(params)), join(staging, "model.onnx"));
  writeFileSync(join(staging, "config.json"), json({ ...familyConfig(params, tokenizer.ids), saeflow_generator: record }));
  writeFileSync(join(staging, "tokenizer.json"), json(tokenizer.tokenizerJson));
  writeFileSync(join(staging, "tokenizer_config.json"), json(tokenizer.tokenizerConfig));
  if (same()) {
    rmSync(staging, { recursive: true, force: true });
    return result(false);
  }
  rmSync(dir, { recursive: true, force: true });
  renameSync(staging, dir);
  return result(true);
}

function main(): void {
  const { values } = parseArgs({
    options: { family: { type: "string" }, out: { type: "string" }, seed: { type: "string", default: "0" } },
  });
  const family = values.family as FamilyName | undefined;
  if (!family || !FAMILY_NAMES.includes(family)) throw new Error(`--family: one of ${FAMILY_NAMES.join(", ")}`);
  const seed = Number(values.seed);
  if (!Number.isInteger(seed)) throw new Error(`--seed: not an integer: ${values.seed}`);
  const tiny = makeTinyFamily({ family, out: values.out ?? `.cache/tiny-${family}`, overrides: { seed } });
  console.log(tiny.generated ? `tiny ${family} written to ${tiny.modelPath}` : `tiny ${family} already at ${tiny.modelPath}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  try {
    main();
  } catch (err) {
    console.error(err instanceof Error ? err.message : err);
    process.exitCode = 1;
  }
}
