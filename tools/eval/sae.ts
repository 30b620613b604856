import { existsSync } from "node:fs";
import { join } from "node:path";
import type { SafeTensor } from "../../services/common/safetensors.js";
import { CFG_FILE, loadSaeLens, WEIGHTS_FILE } from "../../services/trainer/export.js";

/**
 * An SAELens export (cfg.json + sae_weights.safetensors, as services/trainer/export.ts writes it)
 * run forward in plain TypeScript, the way SAELens' SAE.forward does:
 *
 *   pre   = (x - b_dec) @ W_enc + b_enc          (b_dec subtracted when apply_b_dec_to_input)
 *   codes = relu(pre)                            standard
 *         = relu(pre) kept at the k largest pre  topk
 *         = relu(pre) * (pre > threshold)        jumprelu
 *         = (pre > 0) * relu((x - b_dec) @ (W_enc * exp(r_mag)) + b_mag)
 *                                                gated, with b_gate as b_enc
 *   x_hat = codes @ W_dec + b_dec
 *
 * The export folds training's normalisation into the weights, so the SAE reads raw activations.
 */

export type Architecture = "standard" | "topk" | "jumprelu" | "gated";
const ARCHITECTURES: readonly string[] = ["standard", "topk", "jumprelu", "gated"];

export interface Sae {
  dir: string;
  hookName: string;
  architecture: Architecture;
  /** Activation width d. */
  dIn: number;
  /** Latents n. */
  dSae: number;
  /** Latents kept per token (topk). */
  k: number;
  applyBDecToInput: boolean;
  /** [d, n] row-major. */
  wEnc: Float32Array;
  /** [n] b_enc, or b_gate for gated. */
  bEnc: Float32Array;
  /** [n, d] row-major. */
  wDec: Float32Array;
  bDec: Float32Array;
  /** [n] (jumprelu). */
  threshold: Float32Array | undefined;
  /** [n] exp(r_mag) and b_mag of gated's magnitude path. */
  magnitude: { scale: Float32Array; bias: Float32Array } | undefined;
}

/** A folder that is not a usable SAELens export; the message says what is wrong with it. */
export class SaeFolderError extends Error {
  constructor(
    readonly dir: string,
    message: string,
  ) {
    super(message);
    this.name = "SaeFolderError";
  }
}

function tensor(dir: string, tensors: Record<string, SafeTensor>, name: string, shape: number[]): Float32Array {
  const t = tensors[name];
  if (!t) throw new SaeFolderError(dir, `${WEIGHTS_FILE} has no tensor ${name}`);
  if (t.dtype !== "F32") throw new SaeFolderError(dir, `${WEIGHTS_FILE}: ${name} is ${t.dtype}; only F32 exports are read`);
  if (t.shape.join(",") !== shape.join(",")) {
    throw new SaeFolderError(dir, `${WEIGHTS_FILE}: ${name} has shape [${t.shape.join(", ")}], cfg.json implies [${shape.join(", ")}]`);
  }
  return t.data as Float32Array;
}

const positiveInt = (v: unknown): v is number => typeof v === "number" && Number.isInteger(v) && v > 0;

/** Reads and checks an export folder; every problem names the file and key at fault. */
export function loadSae(dir: string): Sae {
  for (const file of [CFG_FILE, WEIGHTS_FILE]) {
    if (!existsSync(join(dir, file)))
      throw new SaeFolderError(dir, `no ${file} here; an SAELens export folder holds ${CFG_FILE} and ${WEIGHTS_FILE}`);
  }
  let loaded: ReturnType<typeof loadSaeLens>;
  try {
    loaded = loadSaeLens(dir);
  } catch (err) {
    throw new SaeFolderError(dir, `unreadable export: ${(err as Error).message}`);
  }
  const { cfg, tensors } = loaded;
  const d = cfg.d_in;
  const n = cfg.d_sae;
  if (!positiveInt(d) || !positiveInt(n)) throw new SaeFolderError(dir, `${CFG_FILE}: d_in and d_sae must be positive integers`);
  const architecture = String(cfg.architecture ?? "standard");
  if (!ARCHITECTURES.includes(architecture))
    throw new SaeFolderError(dir, `${CFG_FILE}: architecture "${architecture}" is not one of ${ARCHITECTURES.join(", ")}`);
  if (typeof cfg.hook_name !== "string" || !cfg.hook_name) throw new SaeFolderError(dir, `${CFG_FILE}: no hook_name`);
  // A normalisation the cfg still asks for would need a dataset statistic the folder does not hold.
  const norm = cfg.normalize_activations ?? "none";
  if (norm !== "none")
    throw new SaeFolderError(
      dir,
      `${CFG_FILE}: normalize_activations is "${String(norm)}"; only exports with it folded into the weights ("none") are read`,
    );
  const kwargs = (cfg.activation_fn_kwargs ?? {}) as Record<string, unknown>;
  const k = cfg.k ?? kwargs.k;
  if (architecture === "topk" && (!positiveInt(k) || k > n))
    throw new SaeFolderError(dir, `${CFG_FILE}: topk needs k between 1 and d_sae (${n}), got ${String(k)}`);
  return {
    dir,
    hookName: cfg.hook_name,
    architecture: architecture as Architecture,
    dIn: d,
    dSae: n,
    k: positiveInt(k) ? k : 0,
    applyBDecToInput: cfg.apply_b_dec_to_input !== false,
    wEnc: tensor(dir, tensors, "W_enc", [d, n]),
    bEnc: tensor(dir, tensors, architecture === "gated" ? "b_gate" : "b_enc", [n]),
    wDec: tensor(dir, tensors, "W_dec", [n, d]),
    bDec: tensor(dir, tensors, "b_dec", [d]),
    threshold: architecture === "jumprelu" ? tensor(dir, tensors, "threshold", [n]) : undefined,
    magnitude:
      architecture === "gated"
        ? { scale: Float32Array.from(tensor(dir, tensors, "r_mag", [n]), Math.exp), bias: tensor(dir, tensors, "b_mag", [n]) }
        : undefined,
  };
}

export interface SaeOutput {
  /** [rows, d] reconstructions. */
  recon: Float32Array;
  /** Nonzero codes of each row. */
  l0: Uint32Array;
}

/**
 * The largest `k` entries of `pre` (ties broken by lower index), as latent ids: the k-th largest
 * value from a native typed-array sort of a scratch copy (n is a few thousand), then one scan.
 */
function topK(pre: Float32Array, k: number, scratch: Float32Array): number[] {
  scratch.set(pre);
  scratch.sort();
  const kth = scratch[pre.length - k]!;
  const out: number[] = [];
  for (let i = 0; i < pre.length; i++) if (pre[i]! > kth) out.push(i);
  for (let i = 0; i < pre.length && out.length < k; i++) if (pre[i] === kth) out.push(i);
  return out;
}

/** The SAE's reconstruction of `rows` activations x [rows, d]. */
export function saeForward(sae: Sae, x: Float32Array, rows: number): SaeOutput {
  const { dIn: d, dSae: n, wEnc, bEnc, wDec, bDec } = sae;
  if (x.length !== rows * d) throw new Error(`SAE ${sae.dir}: input has ${x.length} values, expected ${rows} x ${d}`);
  const recon = new Float32Array(rows * d);
  const l0 = new Uint32Array(rows);
  const pre = new Float32Array(n);
  const scratch = new Float32Array(n);
  const centred = new Float32Array(d);
  const { magnitude } = sae;
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < d; j++) centred[j] = x[r * d + j]! - (sae.applyBDecToInput ? bDec[j]! : 0);
    // gated's two paths share the product x_cent @ W_enc: the gate adds b_gate, the magnitude rescales by exp(r_mag).
    if (magnitude) pre.fill(0);
    else pre.set(bEnc);
    // j outer, i inner: W_enc is [d, n], so the inner loop walks it contiguously.
    for (let j = 0; j < d; j++) {
      const v = centred[j]!;
      const row = j * n;
      for (let i = 0; i < n; i++) pre[i]! += v * wEnc[row + i]!;
    }
    const codeOf = magnitude
      ? (i: number) => (pre[i]! + bEnc[i]! > 0 ? pre[i]! * magnitude.scale[i]! + magnitude.bias[i]! : 0)
      : (i: number) => pre[i]!;
    const active = sae.architecture === "topk" ? topK(pre, sae.k, scratch) : undefined;
    const out = recon.subarray(r * d, (r + 1) * d);
    out.set(bDec);
    const add = (i: number) => {
      const code = codeOf(i);
      if (!(code > 0)) return;
      l0[r]! += 1;
      const at = i * d;
      for (let j = 0; j < d; j++) out[j]! += code * wDec[at + j]!;
    };
    const threshold = sae.threshold;
    if (active) {
      for (const i of active) add(i);
    } else {
      for (let i = 0; i < n; i++) if (!threshold || pre[i]! > threshold[i]!) add(i);
    }
  }
  return { recon, l0 };
}
