import { readFileSync } from "node:fs";
import { type RunConfig, RunConfigSchema } from "../../services/common/config/index.js";
import type { Batch } from "../../services/trainer/batches.js";
import type { LoadedSaeLens } from "../../services/trainer/export.js";
import type { StepSpec } from "../../services/trainer/graph/step.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState, type SaeState } from "../../services/trainer/sae.js";

/** Small step specs for tests. */
export function smallSpec(over: Partial<StepSpec> = {}): StepSpec {
  return {
    recipe: "topk",
    batchSize: 8,
    dModel: 6,
    width: 16,
    k: 3,
    annealK: false,
    prefixes: [],
    input: "fp32",
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    unitNormDecoder: true,
    auxK: false,
    gradClipNorm: 0,
    ...over,
  };
}

/** Gaussian rows, seeded. */
export function gaussianBatch(rows: number, d: number, seed: string, scale = 1): Float32Array {
  const rng = new Rng(7, seed);
  return Float32Array.from({ length: rows * d }, () => rng.normal() * scale);
}

/**
 * A state with nonzero biases, so every term of the step is exercised; decoder rows of unequal
 * norms when the spec leaves them free, a live magnitude path for gated, and thresholds amid the
 * pre-activations for jumprelu_trained.
 */
export function busyState(spec: StepSpec, seed: string): SaeState {
  const { width: n, dModel: d } = spec;
  const rng = new Rng(11, seed);
  const s = initState(
    n,
    d,
    rng,
    Float32Array.from({ length: d }, () => 0.1 * rng.normal()),
    { recipe: spec.recipe },
  );
  for (let i = 0; i < s.W_enc.length; i++) s.W_enc[i]! += 0.2 * rng.normal();
  for (let i = 0; i < n; i++) s.b_enc[i] = 0.1 * rng.normal();
  if (!spec.unitNormDecoder) {
    for (let i = 0; i < n; i++) {
      const c = 0.5 + rng.uniform();
      for (let j = i * d; j < (i + 1) * d; j++) s.W_dec[j]! *= c;
    }
  }
  if (s.r_mag && s.b_mag) for (let i = 0; i < n; i++) [s.r_mag[i], s.b_mag[i]] = [0.3 * rng.normal(), 0.1 * rng.normal()];
  // Thresholds spread over the pre-activations' range; latent 0's below zero, where relu(theta) passes no gradient.
  if (s.threshold) for (let i = 0; i < n; i++) s.threshold[i] = i === 0 ? -0.1 : 0.05 + 0.6 * rng.uniform();
  return s;
}

/** Activations made of known sparse directions: each row sums `active` of `features` unit directions. */
export interface SparseData {
  directions: Float32Array; // [features, d], unit rows
  batches: Float32Array[]; // each [rows, d]
}

export function sparseData(opts: {
  d: number;
  features: number;
  active: number;
  rows: number;
  batches: number;
  seed: string;
  noise?: number;
}): SparseData {
  const { d, features, active, rows } = opts;
  const rng = new Rng(3, opts.seed);
  const directions = new Float32Array(features * d);
  for (let f = 0; f < features; f++) {
    let norm = 0;
    for (let j = 0; j < d; j++) norm += (directions[f * d + j] = rng.normal()) ** 2;
    for (let j = 0; j < d; j++) directions[f * d + j]! /= Math.sqrt(norm);
  }
  const batches: Float32Array[] = [];
  for (let b = 0; b < opts.batches; b++) {
    const x = new Float32Array(rows * d);
    for (let r = 0; r < rows; r++) {
      const chosen = new Set<number>();
      while (chosen.size < active) chosen.add(rng.uint32() % features);
      for (const f of chosen) {
        const c = 1 + rng.uniform();
        for (let j = 0; j < d; j++) x[r * d + j]! += c * directions[f * d + j]!;
      }
      for (let j = 0; j < d; j++) x[r * d + j]! += (opts.noise ?? 0.01) * rng.normal();
    }
    batches.push(x);
  }
  return { directions, batches };
}

/** For each direction, the best cosine similarity with any decoder row. */
export function bestCosines(directions: Float32Array, wDec: Float32Array, d: number): number[] {
  const features = directions.length / d;
  const n = wDec.length / d;
  return Array.from({ length: features }, (_, f) => {
    let best = -1;
    for (let i = 0; i < n; i++) {
      let dot = 0;
      let norm = 0;
      for (let j = 0; j < d; j++) {
        dot += directions[f * d + j]! * wDec[i * d + j]!;
        norm += wDec[i * d + j]! ** 2;
      }
      best = Math.max(best, dot / Math.sqrt(norm || 1));
    }
    return best;
  });
}

/** The pools of a test run and where its buffer is: `dModel` and `hookPoint` make one pool, `pools` several. */
export interface TestPools {
  hookPoint?: string;
  dModel?: number;
  pools?: Array<{ name: string; dModel: number }>;
  /** buffer.address: the one buffer's, with no shards. */
  address?: string;
  shards?: Array<{ address: string; hookPoints: string[] }>;
}

/**
 * A run config for library tests: small, single-threaded, writing under `dir`. Its pools (widths
 * live there) come from `pools`, by default one of width 64; trainer.hookPoints defaults to every pool.
 */
export function testConfig(dir: string, trainer: Record<string, unknown>, pools: TestPools = {}): RunConfig {
  const hookPoints = pools.pools ?? [{ name: pools.hookPoint ?? "blocks.1.hook_resid_post", dModel: pools.dModel ?? 64 }];
  const t = {
    hookPoints: hookPoints.map((h) => h.name),
    logEvery: 25,
    checkpointEvery: 0,
    lrWarmupSteps: 10,
    threads: 1,
    exportOnFinish: false,
    ...trainer,
  };
  return RunConfigSchema.parse({
    run: { dir, seed: 5 },
    buffer: {
      hookPoints,
      ...(pools.address ? { address: pools.address } : {}),
      ...(pools.shards ? { shards: pools.shards } : {}),
    },
    producer: { hookPoints: hookPoints.map((h) => h.name) },
    trainer: t,
  });
}

export const asBatches = (xs: readonly Float32Array[], rows: number, d: number): Batch[] =>
  xs.map((data) => ({ data, dtype: "fp32", rows, dModel: d, traceparent: "" }));

/**
 * SAELens' forward pass of an export on raw activations: the codes and the reconstruction. gated:
 * pre is the gate (b_gate), and a kept latent's code is relu(x_cent @ (W_enc * exp(r_mag)) + b_mag).
 */
export function saeLensForward(exp: LoadedSaeLens, x: Float32Array): { codes: Float32Array; recon: Float32Array } {
  const d = exp.cfg.d_in as number;
  const n = exp.cfg.d_sae as number;
  const arch = exp.cfg.architecture as string;
  const t = (name: string) => exp.tensors[name]!.data as Float32Array;
  const gated = arch === "gated";
  const [wEnc, bEnc, wDec, bDec] = [t("W_enc"), t(gated ? "b_gate" : "b_enc"), t("W_dec"), t("b_dec")];
  const rows = x.length / d;
  const codes = new Float32Array(rows * n);
  const recon = new Float32Array(rows * d);
  for (let r = 0; r < rows; r++) {
    const pre = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      let s = bEnc[i]!;
      for (let j = 0; j < d; j++) s += (x[r * d + j]! - bDec[j]!) * wEnc[j * n + i]!;
      pre[i] = s;
    }
    const keep = new Set<number>();
    if (arch === "topk") {
      for (const i of Array.from(pre.keys())
        .sort((a, b) => pre[b]! - pre[a]!)
        .slice(0, exp.cfg.k as number))
        keep.add(i);
    } else if (arch !== "gated") {
      for (let i = 0; i < n; i++) if (arch === "standard" || pre[i]! > t("threshold")[i]!) keep.add(i);
    }
    for (let i = 0; i < n; i++) if (gated && pre[i]! > 0) keep.add(i);
    const magnitude = (i: number) => {
      let m = t("b_mag")[i]!;
      for (let j = 0; j < d; j++) m += (x[r * d + j]! - bDec[j]!) * wEnc[j * n + i]! * Math.exp(t("r_mag")[i]!);
      return m;
    };
    for (const i of keep) codes[r * n + i] = Math.max(gated ? magnitude(i) : pre[i]!, 0);
    for (let j = 0; j < d; j++) {
      let s = bDec[j]!;
      for (let i = 0; i < n; i++) s += codes[r * n + i]! * wDec[i * d + j]!;
      recon[r * d + j] = s;
    }
  }
  return { codes, recon };
}

/** 1 - |x - recon|^2 / |x - mean x|^2 over the rows. */
export function explainedVariance(x: Float32Array, recon: Float32Array, d: number): number {
  const rows = x.length / d;
  const mean = new Float64Array(d);
  for (let i = 0; i < x.length; i++) mean[i % d]! += x[i]! / rows;
  let sse = 0;
  let sst = 0;
  for (let i = 0; i < x.length; i++) {
    sse += (x[i]! - recon[i]!) ** 2;
    sst += (x[i]! - mean[i % d]!) ** 2;
  }
  return 1 - sse / sst;
}

export function readJsonl(path: string): Array<Record<string, number | string>> {
  return readFileSync(path, "utf8")
    .trim()
    .split("\n")
    .map((line) => JSON.parse(line) as Record<string, number | string>);
}
