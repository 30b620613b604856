import { mkdirSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { readSafetensors, type SafeTensor, writeSafetensors } from "../common/safetensors.js";
import type { FiringCounts } from "./firing.js";
import { stateOf, stateShape, type StepRecipe } from "./graph/step.js";
import type { RngState } from "./rng.js";
import { type SaeState, stateTensor } from "./sae.js";

/**
 * A checkpoint is one safetensors file per SAE and step: weights, Adam moments, the per-latent
 * last-fired token counts and the firing counts of the sparsity windows as tensors; step, tokens,
 * RNG state, normalisation and the config as JSON metadata. Files are written atomically, so the newest complete file is always a good one.
 */

export interface CheckpointMeta {
  /** Steps taken. */
  step: number;
  /** Tokens trained on. */
  tokens: number;
  rng: RngState;
  /** Normalisation factor x -> x * scale. */
  scale: number;
  /** batchtopk, matryoshka: running minimum kept score (the inference threshold). */
  thresholdEma: number;
  /** Tokens counted by the current and the previous sparsity window. */
  firedTokens: [number, number];
  /** The SAE's config and the trainer settings it was trained with, for provenance and checks. */
  config: Record<string, unknown>;
}

export interface Checkpoint {
  meta: CheckpointMeta;
  state: SaeState;
  lastFired: Float64Array;
  /** Firing counts of the current and the previous sparsity window (their tokens are in meta). */
  fired: [Float64Array, Float64Array];
}

/** The firing windows a checkpoint holds, as FiringWindows keeps them. */
export const firingOf = (c: Checkpoint): [FiringCounts, FiringCounts] => [
  { fired: c.fired[0], tokens: c.meta.firedTokens[0] },
  { fired: c.fired[1], tokens: c.meta.firedTokens[1] },
];

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
export function saveCheckpoint(dir: string, ckpt: Checkpoint, recipe: StepRecipe, n: number, d: number, keep: number): string {
  mkdirSync(dir, { recursive: true });
  const tensors: Record<string, SafeTensor> = {};
  for (const s of stateOf(recipe)) tensors[s] = { dtype: "F32", shape: stateShape(s, n, d), data: stateTensor(ckpt.state, s) };
  tensors.last_fired = { dtype: "F64", shape: [n], data: ckpt.lastFired };
  tensors.fired_current = { dtype: "F64", shape: [n], data: ckpt.fired[0] };
  tensors.fired_previous = { dtype: "F64", shape: [n], data: ckpt.fired[1] };
  const path = checkpointPath(dir, ckpt.meta.step);
  writeSafetensors(path, tensors, { saeflow: JSON.stringify(ckpt.meta) });
  for (const step of checkpointSteps(dir).slice(0, -keep)) rmSync(checkpointPath(dir, step), { force: true });
  return path;
}

/** Reads a checkpoint, checking it holds the tensors, in the shapes, an SAE of `recipe` and width n over d needs. */
export function loadCheckpoint(path: string, recipe: StepRecipe, n: number, d: number): Checkpoint {
  const file = readSafetensors(path);
  const raw = file.metadata.saeflow;
  if (!raw) throw new Error(`${path}: not a saeflow checkpoint (no saeflow metadata)`);
  const meta = JSON.parse(raw) as CheckpointMeta;
  const state: Partial<Record<string, Float32Array>> = {};
  for (const s of stateOf(recipe)) {
    const t = file.tensors[s];
    const want = stateShape(s, n, d);
    if (!t || t.dtype !== "F32" || t.shape.join(",") !== want.join(",")) {
      throw new Error(`${path}: ${s} is ${t ? `${t.dtype} [${t.shape.join(", ")}]` : "missing"}, expected F32 [${want.join(", ")}]`);
    }
    state[s] = t.data as Float32Array;
  }
  const counts = (name: string): Float64Array => {
    const t = file.tensors[name];
    if (!t || t.dtype !== "F64" || t.data.length !== n) throw new Error(`${path}: ${name} is missing or not F64 [${n}]`);
    return t.data as Float64Array;
  };
  return { meta, state: state as SaeState, lastFired: counts("last_fired"), fired: [counts("fired_current"), counts("fired_previous")] };
}
