import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-node";
import { HOOK_KINDS } from "../../services/producer/model/hooks.js";
import { FAMILIES, type FamilyName } from "../../tools/model/families.js";
import { makeTinyFamily, type TinyFamily, type TinyFamilyOptions } from "../../tools/model/tiny-family.js";
import { makeTinyLlama, type TinyLlama, type TinyLlamaOptions } from "../../tools/model/tiny-llama.js";

/** A tiny llama generated into a fresh temp folder for one test file; `remove` deletes the folder. */
export function tempTinyLlama(options: Partial<TinyLlamaOptions> = {}): TinyLlama & { remove: () => void } {
  const root = mkdtempSync(join(tmpdir(), "saeflow-model-"));
  const tiny = makeTinyLlama({ ...options, out: join(root, "tiny-llama") });
  return { ...tiny, remove: () => rmSync(root, { recursive: true, force: true }) };
}

/** A tiny model of `family` generated into a fresh temp folder; `remove` deletes the folder. */
export function tempTinyFamily(family: FamilyName, overrides: TinyFamilyOptions["overrides"] = {}): TinyFamily & { remove: () => void } {
  const root = mkdtempSync(join(tmpdir(), "saeflow-family-"));
  const tiny = makeTinyFamily({ family, out: join(root, `tiny-${family}`), overrides });
  return { ...tiny, remove: () => rmSync(root, { recursive: true, force: true }) };
}

const int64 = (rows: number[][]) => new ort.Tensor("int64", BigInt64Array.from(rows.flat(), BigInt), [rows.length, rows[0]!.length]);

/** Feeds for equal-length rows; `masks` marks padding with 0 and defaults to all ones. */
export function feedsFor(ids: number[][], masks?: number[][], positions?: number[][]): Record<string, ort.Tensor> {
  return {
    input_ids: int64(ids),
    attention_mask: int64(masks ?? ids.map((row) => row.map(() => 1))),
    position_ids: int64(positions ?? ids.map((row) => row.map((_, i) => i))),
  };
}

/** Row `row` of a [batch, seq, width] tensor's data. */
export function rowOf(tensor: ort.Tensor, row: number): Float32Array {
  const size = tensor.dims.slice(1).reduce((a, b) => a * b, 1);
  return (tensor.data as Float32Array).subarray(row * size, (row + 1) * size);
}

export const maxAbs = (a: Float32Array): number => a.reduce((m, v) => Math.max(m, Math.abs(v)), 0);

/** Every hook point of a family's model; a parallel GPT-NeoX layer has no resid_mid. */
export function allHooks(family: FamilyName, layers: number): string[] {
  const kinds = HOOK_KINDS.filter((k) => !(FAMILIES[family].parallel && k === "hook_resid_mid"));
  return [...Array(layers).keys()].flatMap((l) => kinds.map((k) => `blocks.${l}.${k}`));
}
