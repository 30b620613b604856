import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { ConfigError } from "../../services/common/config/index.js";
import type { Rates } from "./model.js";

/**
 * Rates when nothing better is given, each with where it comes from. The GPU figures were measured
 * by this project on an H200 with PyTorch (docs/deploy.md), not by saeflow's own GPU path, which had
 * no GPU to run on when this was written; `npm run bench -- trainer-gpu producer buffer` on the
 * cluster's own nodes, passed with --bench, replaces them.
 */
export const DEFAULT_RATES: Rates = {
  producerTokensPerSecond: 39_000,
  modelLayers: 32,
  trainerTokensPerSecond: { 32768: 182_000, 131072: 56_600 },
  bufferBytesPerSecond: 40_000 * 8192,
  linkBytesPerSecond: 12.5e9,
  producersPerNode: 8,
  trainersPerNode: 8,
  buffersPerNode: 8,
  bufferNodeBytes: 1.5 * 2 ** 40,
  sources: {
    producerTokensPerSecond:
      "given (docs/deploy.md): H200, PyTorch bf16, Llama-3.1-8B cut after block 15 ran 78k tok/s: the whole 32-block model at half that",
    modelLayers: "given: Llama-3.1-8B's 32 blocks",
    trainerTokensPerSecond:
      "given (docs/deploy.md): H200, PyTorch TopK step at B=4096, d=4096: 22.5 ms at 32768 latents, 72.4 ms at 131072",
    bufferBytesPerSecond:
      "bench key buffer.e2e_8192b_rows_per_s: ~40k rows/s x 8192 B, one buffer process on 2 cores (npm run bench -- buffer)",
    linkBytesPerSecond: "given: a 100 Gb/s pod network link per node",
    producersPerNode: "given: 8-GPU nodes, one producer per GPU",
    trainersPerNode: "given: 8-GPU nodes, one trainer per GPU",
    buffersPerNode: "given: 8 buffer shards per memory node (2 cores each, as the buffer bench ran one)",
    bufferNodeBytes: "given: 1.5 TiB of memory on a buffer node",
  },
};

/** A rates file: any subset of the rates, overriding the defaults (YAML or JSON). */
const RatesFile = z
  .object({
    producerTokensPerSecond: z.number().positive(),
    modelLayers: z.number().int().positive(),
    trainerTokensPerSecond: z.record(z.string().regex(/^\d+$/), z.number().positive()),
    bufferBytesPerSecond: z.number().positive(),
    linkBytesPerSecond: z.number().positive(),
    producersPerNode: z.number().int().positive(),
    trainersPerNode: z.number().int().positive(),
    buffersPerNode: z.number().int().positive(),
    bufferNodeBytes: z.number().positive(),
  })
  .partial()
  .strict();

/** A file a flag names, or a ConfigError naming the flag. */
function readFlagFile(flag: string, path: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (err) {
    throw ConfigError.at(flag, `cannot read ${path}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
}

export function ratesFromFile(path: string, base: Rates = DEFAULT_RATES): Rates {
  const parsed = RatesFile.safeParse(parseYaml(readFlagFile("--rates", path)));
  if (!parsed.success) {
    throw ConfigError.at(
      "--rates",
      `${path}: ${parsed.error.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`).join("; ")}`,
    );
  }
  const out: Rates = { ...base, sources: { ...base.sources } };
  for (const [key, value] of Object.entries(parsed.data)) {
    if (key === "trainerTokensPerSecond")
      out.trainerTokensPerSecond = Object.fromEntries(Object.entries(value as Record<string, number>).map(([w, r]) => [Number(w), r]));
    else (out as unknown as Record<string, number>)[key] = value as number;
    out.sources[key] = `given in ${path}`;
  }
  return out;
}

/**
 * Rates a bench run measured, from the JSON line `npm run bench` ends with: the buffer's push+serve
 * rate of 8 KiB rows, and the trainer's and producer's GPU rates where that run had a GPU.
 */
export function ratesFromBench(path: string, base: Rates = DEFAULT_RATES): Rates {
  const lines = readFlagFile("--bench", path).trim().split("\n");
  let figures: Record<string, number | string>;
  try {
    figures = JSON.parse(lines[lines.length - 1]!) as Record<string, number | string>;
  } catch {
    throw ConfigError.at("--bench", `${path}: its last line is not the JSON line \`npm run bench\` ends with`);
  }
  const out: Rates = { ...base, sources: { ...base.sources }, trainerTokensPerSecond: { ...base.trainerTokensPerSecond } };
  const num = (key: string) => (typeof figures[key] === "number" ? (figures[key] as number) : undefined);
  const rows = num("buffer.e2e_8192b_rows_per_s");
  if (rows) {
    out.bufferBytesPerSecond = rows * 8192;
    out.sources.bufferBytesPerSecond = `bench key buffer.e2e_8192b_rows_per_s in ${path}: ${rows} rows/s x 8192 B on ${figures.cores} cores`;
  }
  // The trainer's GPU step with bf16 batches, as a Llama Scope run feeds it; only from a run on a GPU.
  if (figures["trainer-gpu.gpu"] === 1) {
    for (const [key, value] of Object.entries(figures)) {
      const m = /^trainer-gpu\.d\d+_n(\d+)_k\d+_b\d+_bf16_step_tok_s$/.exec(key);
      if (!m || typeof value !== "number") continue;
      out.trainerTokensPerSecond[Number(m[1])] = value;
      out.sources.trainerTokensPerSecond = `bench keys trainer-gpu.*_bf16_step_tok_s in ${path}, on ${figures["trainer-gpu.device"]}`;
    }
  }
  return out;
}
