import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import type { SaeLensArchitecture } from "../common/config/recipes.js";
import { readSafetensors, type SafeTensor, syncDir, writeAtomic, writeSafetensors } from "../common/safetensors.js";
import { type FiringCounts, logSparsity } from "./firing.js";
import type { SaeState } from "./sae.js";

/**
 * Export in the layout SAELens loads (`SAE.load_from_disk(folder)`): cfg.json and
 * sae_weights.safetensors with W_enc [d, n], b_enc [n], W_dec [n, d], b_dec [d], plus threshold [n]
 * for JumpReLU, or b_gate, r_mag, b_mag [n] in place of b_enc for gated; and sparsity.safetensors,
 * the log10 firing frequency SAELens saves beside them. The dataset-wide normalisation is folded
 * into the weights, as SAELens' fold_activation_norm_scaling_factor does, so the export runs on raw
 * activations; so are free decoder-row norms, as its fold_W_dec_norm does, so every decoder row has
 * unit norm and a TopK export ranks latents the way training did.
 */

export const CFG_FILE = "cfg.json";
export const WEIGHTS_FILE = "sae_weights.safetensors";
export const SPARSITY_FILE = "sparsity.safetensors";

export type { SaeLensArchitecture };

export interface ExportInfo {
  architecture: SaeLensArchitecture;
  /** Active latents per token (topk). */
  k: number;
  /** Per-latent thresholds on the pre-activation, in training units (jumprelu). */
  threshold?: Float32Array;
  /** Normalisation x -> x * scale used in training, folded away here. */
  scale: number;
  /** Fold decoder-row norms into the encoder (decoders trained without unit-norm rows). */
  foldDecoderNorm?: boolean;
  /** Firing counts over the last tokens; written as sparsity.safetensors when given. */
  firing?: FiringCounts;
  hookName: string;
  modelName: string;
  contextSize: number;
  prependBos: boolean;
  /** Provenance kept in cfg.json under "saeflow" (SAELens ignores unknown keys). */
  provenance: Record<string, unknown>;
}

/** The layer of "blocks.12.hook_resid_post"; 0 when the name carries none. */
export const hookLayer = (hookName: string) => Number(/(?:^|\.)(?:blocks|layers)\.(\d+)\./.exec(hookName)?.[1] ?? 0);

/**
 * SAELens' weights with the normalisation folded in: W_enc * s (transposed to [d, n]), W_dec / s,
 * b_dec / s; and, folding decoder-row norms c_i, encoder row i, its biases and its threshold times
 * c_i, decoder row i / c_i (gated's r_mag is a log-scale of the already scaled row, so it stays).
 */
export function saeLensTensors(state: SaeState, n: number, d: number, info: ExportInfo): Record<string, SafeTensor> {
  const s = info.scale;
  const c = new Float64Array(n).fill(1);
  if (info.foldDecoderNorm) {
    for (let i = 0; i < n; i++) {
      let sq = 0;
      for (let j = i * d; j < (i + 1) * d; j++) sq += state.W_dec[j]! ** 2;
      c[i] = Math.max(Math.sqrt(sq), 1e-12);
    }
  }
  const wEnc = new Float32Array(n * d);
  for (let i = 0; i < n; i++) for (let j = 0; j < d; j++) wEnc[j * n + i] = state.W_enc[i * d + j]! * s * c[i]!;
  const perLatent = (v: ArrayLike<number>) => Float32Array.from({ length: n }, (_, i) => v[i]! * c[i]!);
  const gated = info.architecture === "gated";
  const tensors: Record<string, SafeTensor> = {
    W_enc: { dtype: "F32", shape: [d, n], data: wEnc },
    [gated ? "b_gate" : "b_enc"]: { dtype: "F32", shape: [n], data: perLatent(state.b_enc) },
    W_dec: { dtype: "F32", shape: [n, d], data: Float32Array.from(state.W_dec, (v, at) => v / s / c[Math.floor(at / d)]!) },
    b_dec: { dtype: "F32", shape: [d], data: Float32Array.from(state.b_dec, (v) => v / s) },
  };
  if (gated) {
    if (!state.r_mag || !state.b_mag) throw new Error("gated export needs r_mag and b_mag");
    tensors.r_mag = { dtype: "F32", shape: [n], data: Float32Array.from(state.r_mag) };
    tensors.b_mag = { dtype: "F32", shape: [n], data: perLatent(state.b_mag) };
  }
  if (info.architecture === "jumprelu") {
    if (!info.threshold || info.threshold.length !== n) throw new Error("jumprelu export needs a threshold per latent");
    tensors.threshold = { dtype: "F32", shape: [n], data: perLatent(info.threshold) };
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
    if (info.firing) writeSafetensors(join(tmp, SPARSITY_FILE), { sparsity: { dtype: "F32", shape: [n], data: logSparsity(info.firing) } });
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
  /** log10 firing frequency per latent, when the folder holds sparsity.safetensors. */
  sparsity?: Float32Array;
}

/** Reads an export folder back (tools, tests). */
export function loadSaeLens(dir: string): LoadedSaeLens {
  const sparsity = existsSync(join(dir, SPARSITY_FILE)) ? readSafetensors(join(dir, SPARSITY_FILE)).tensors.sparsity : undefined;
  return {
    cfg: JSON.parse(readFileSync(join(dir, CFG_FILE), "utf8")) as Record<string, unknown>,
    tensors: readSafetensors(join(dir, WEIGHTS_FILE)).tensors,
    ...(sparsity ? { sparsity: sparsity.data as Float32Array } : {}),
  };
}
