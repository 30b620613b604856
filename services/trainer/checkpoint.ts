import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { readSafetensors, type SafeTensor, writeSafetensors } from "../common/safetensors.js";
import { STATE, stateShape } from "./graph/step.js";
import type { RngState } from "./rng.js";
import type { SaeState } from "./sae.js";

/**
 * A checkpoint is one safetensors file per SAE and step: weights, Adam moments and the per-latent
 * last-fired token counts as tensors; step, tokens, RNG state, normalisation and the config as JSON
 * metadata. Files are written atomically, so the newest complete file is always a good one.
 */

export interface CheckpointMeta {
  /** Steps taken. */
  step: number;
  /** Tokens trained on. */
  tokens: number;
  rng: RngState;
  /** Normalisation factor x -> x * scale. */
  scale: number;
  /** batchtopk: running minimum kept activation (the inference threshold). */
  thresholdEma: number;
  /** The SAE's config and the trainer settings it was trained with, for provenance and checks. */
  config: Record<string, unknown>;
}

export interface Checkpoint {
  meta: CheckpointMeta;
  state: SaeState;
  lastFired: Float64Array;
}

const FILE = /^step-(\d+)\.safetensors$/;
const fileName = (step: number) => `step-${String(step).padStart(9, "0")}.safetensors`;

/** Steps with a complete checkpoint in `dir`, oldest first. */
export function checkpointSteps(dir: string): number[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  return names
    .map((f) => FILE.exec(f))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

export const checkpointPath = (dir: string, step: number) => join(dir, fileName(step));

/** Writes the checkpoint for `meta.step` and keeps only the newest `keep`. Returns its path. */
export function saveCheckpoint(dir: string, ckpt: Checkpoint, n: number, d: number, keep: number): string {
  mkdirSync(dir, { recursive: true });
  const tensors: Record<string, SafeTensor> = {};
  for (const s of STATE) tensors[s] = { dtype: "F32", shape: stateShape(s, n, d), data: ckpt.state[s] };
  tensors.last_fired = { dtype: "F64", shape: [n], data: ckpt.lastFired };
  const path = checkpointPath(dir, ckpt.meta.step);
  writeSafetensors(path, tensors, { saeflow: JSON.stringify(ckpt.meta) });
  for (const step of checkpointSteps(dir).slice(0, -keep)) rmSync(checkpointPath(dir, step), { force: true });
  return path;
}

/** Reads a checkpoint, checking its tensors have the shapes an SAE of width n over d needs. */
export function loadCheckpoint(path: string, n: number, d: number): Checkpoint {
  const file = readSafetensors(path);
  const raw = file.metadata.saeflow;
  if (!raw) throw new Error(`${path}: not a saeflow checkpoint (no saeflow metadata)`);
  const meta = JSON.parse(raw) as CheckpointMeta;
  const state = {} as SaeState;
  for (const s of STATE) {
    const t = file.tensors[s];
    const want = stateShape(s, n, d);
    if (!t || t.dtype !== "F32" || t.shape.join(",") !== want.join(",")) {
      throw new Error(`${path}: ${s} is ${t ? `${t.dtype} [${t.shape.join(", ")}]` : "missing"}, expected F32 [${want.join(", ")}]`);
    }
    state[s] = t.data as Float32Array;
  }
  const lastFired = file.tensors.last_fired;
  if (!lastFired || lastFired.dtype !== "F64" || lastFired.data.length !== n) throw new Error(`${path}: last_fired is missing or not F64 [${n}]`);
  return { meta, state, lastFired: lastFired.data as Float64Array };
}
