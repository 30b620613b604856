import { join } from "node:path";
import { type ExportInfo, exportSaeLens, type SaeLensArchitecture } from "../../services/trainer/export.js";
import { allocState, type SaeState } from "../../services/trainer/sae.js";
import { makeTinyLlama, type TinyLlama } from "../../tools/model/tiny-llama.js";

/** The shared tiny model (.cache/tiny-llama, generated once and reused by every test file that asks). */
export const tinyLlama = (): TinyLlama => makeTinyLlama({ out: join(import.meta.dirname, "../../.cache/tiny-llama"), seed: 0 });

export interface SaeSpec {
  hook: string;
  architecture?: SaeLensArchitecture;
  /** Latents. */
  n: number;
  d: number;
  k?: number;
  threshold?: Float32Array;
  /** Fills the state (latent-major W_enc and W_dec, [n, d]); all zeros when absent. */
  fill?: (state: SaeState) => void;
}

/** An SAELens export written by the trainer's own exporter, so the tests read what a run leaves. */
export function writeSae(dir: string, spec: SaeSpec): string {
  const state = allocState(spec.n, spec.d);
  spec.fill?.(state);
  const info: ExportInfo = {
    architecture: spec.architecture ?? "standard",
    k: spec.k ?? 1,
    scale: 1,
    hookName: spec.hook,
    modelName: "tiny-llama",
    contextSize: 32,
    prependBos: true,
    provenance: { test: true },
    ...(spec.threshold ? { threshold: spec.threshold } : {}),
  };
  return exportSaeLens(dir, state, spec.n, spec.d, info);
}

/**
 * An SAE that reconstructs exactly: 2d ReLU latents, latent i reads +x_i and latent d+i reads -x_i,
 * and the decoder adds them back with the same signs, so relu(x_i) - relu(-x_i) = x_i in floats.
 */
export const identitySae = (dir: string, hook: string, d: number): string =>
  writeSae(dir, {
    hook,
    n: 2 * d,
    d,
    fill: (s) => {
      for (let i = 0; i < d; i++) {
        s.W_enc[i * d + i] = s.W_dec[i * d + i] = 1;
        s.W_enc[(d + i) * d + i] = s.W_dec[(d + i) * d + i] = -1;
      }
    },
  });

/** All weights zero: reconstructs every activation as 0, i.e. zero ablation. */
export const zeroSae = (dir: string, hook: string, d: number): string => writeSae(dir, { hook, n: 2 * d, d });
