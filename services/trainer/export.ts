import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { readSafetensors, type SafeTensor, syncDir, writeAtomic, writeSafetensors } from "../common/safetensors.js";
import type { SaeState } from "./sae.js";

/**
 * Export in the layout SAELens loads (`SAE.load_from_disk(folder)`): cfg.json and
 * sae_weights.safetensors with W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d] and, for JumpReLU,
 * threshold [n]. The dataset-wide normalisation is folded into the weights, as SAELens'
 * fold_activation_norm_scaling_factor does, so the export runs on raw activations.
 */

export const CFG_FILE = "cfg.json";
export const WEIGHTS_FILE = "sae_weights.safetensors";

export type SaeLensArchitecture = "standard" | "topk" | "jumprelu";

export interface ExportInfo {
  architecture: SaeLensArchitecture;
  /** Active latents per token (topk). */
  k: number;
  /** Per-latent thresholds on the pre-activation (jumprelu). */
  threshold?: Float32Array;
  /** Normalisation x -> x * scale used in training, folded away here. */
  scale: number;
  hookName: string;
  modelName: string;
  contextSize: number;
  prependBos: boolean;
  /** Provenance kept in cfg.json under "saeflow" (SAELens ignores unknown keys). */
  provenance: Record<string, unknown>;
}

/** The layer of "blocks.12.hook_resid_post"; 0 when the name carries none. */
export const hookLayer = (hookName: string) => Number(/(?:^|\.)(?:blocks|layers)\.(\d+)\./.exec(hookName)?.[1] ?? 0);

/** SAELens' weights with the normalisation folded in: W_enc * s (transposed to [d, n]), W_dec / s, b_dec / s. */
export function saeLensTensors(state: SaeState, n: number, d: number, info: ExportInfo): Record<string, SafeTensor> {
  const s = info.scale;
  const wEnc = new Float32Array(n * d);
  for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) wEnc[j * n + i] = state.W_enc[i * d + j]! * s;
  const tensors: Record<string, SafeTensor> = {
    W_enc: { dtype: "F32", shape: [d, n], data: wEnc },
    b_enc: { dtype: "F32", shape: [n], data: Float32Array.from(state.b_enc) },
    W_dec: { dtype: "F32", shape: [n, d], data: Float32Array.from(state.W_dec, (v) => v / s) },
    b_dec: { dtype: "F32", shape: [d], data: Float32Array.from(state.b_dec, (v) => v / s) },
  };
  if (info.architecture === "jumprelu") {
    if (!info.threshold || info.threshold.length !== n) throw new Error("jumprelu export needs a threshold per latent");
    tensors.threshold = { dtype: "F32", shape: [n], data: info.threshold };
  }
  return tensors;
}

/** cfg.json in the flat layout SAELens 5 reads and SAELens 6 converts on load. */
export function saeLensConfig(n: number, d: number, info: ExportInfo): Record<string, unknown> {
  const topk = info.architecture === "topk";
  return {
    architecture: info.architecture,
    d_in: d,
    d_sae: n,
    dtype: "float32",
    device: "cpu",
    model_name: info.modelName,
    hook_name: info.hookName,
    hook_layer: hookLayer(info.hookName),
    hook_head_index: null,
    activation_fn_str: topk ? "topk" : "relu",
    activation_fn_kwargs: topk ? { k: info.k } : {},
    ...(topk ? { k: info.k } : {}),
    apply_b_dec_to_input: true,
    finetuning_scaling_factor: false,
    normalize_activations: "none",
    context_size: info.contextSize,
    prepend_bos: info.prependBos,
    dataset_path: "",
    dataset_trust_remote_code: false,
    sae_lens_training_version: null,
    neuronpedia_id: null,
    model_from_pretrained_kwargs: {},
    seqpos_slice: [null],
    saeflow: info.provenance,
  };
}

/**
 * Writes the export folder `dir` whole: into a temporary folder, then swapped in by renames, so a
 * reader never sees a half-written export.
 */
export function exportSaeLens(dir: string, state: SaeState, n: number, d: number, info: ExportInfo): string {
  const parent = dirname(dir);
  mkdirSync(parent, { recursive: true });
  const tmp = `${dir}.tmp-${process.pid}`;
  const old = `${dir}.old-${process.pid}`;
  const tensors = saeLensTensors(state, n, d, info);
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp);
  try {
    writeSafetensors(join(tmp, WEIGHTS_FILE), tensors);
    writeAtomic(join(tmp, CFG_FILE), [Buffer.from(`${JSON.stringify(saeLensConfig(n, d, info), null, 2)}\n`)]);
  } catch (err) {
    rmSync(tmp, { recursive: true, force: true });
    throw err;
  }
  if (existsSync(dir)) renameSync(dir, old);
  renameSync(tmp, dir);
  syncDir(parent);
  rmSync(old, { recursive: true, force: true });
  return dir;
}

export interface LoadedSaeLens {
  cfg: Record<string, unknown>;
  tensors: Record<string, SafeTensor>;
}

/** Reads an export folder back (tools, tests). */
export function loadSaeLens(dir: string): LoadedSaeLens {
  return {
    cfg: JSON.parse(readFileSync(join(dir, CFG_FILE), "utf8")) as Record<string, unknown>,
    tensors: readSafetensors(join(dir, WEIGHTS_FILE)).tensors,
  };
}
