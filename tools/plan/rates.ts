import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import type { Rates } from "./model.js";

/**
 * Rates when nothing better is given, each with where it comes from. The GPU figures were measured
 * by this project on an H200 with PyTorch (docs/deploy.md), not by saeflow's own GPU path, which had
 * no GPU to run on when this was written; `npm run bench -- trainer-gpu producer buffer` on the
 * cluster's own nodes, passed with --bench, replaces them.
 */
export const DEFAULT_RATES: Rates = {
  producerTokensPerSecond: 39_000,
  trainerTokensPerSecond: { 32768: 182_000, 131072: 56_600 },
  bufferBytesPerSecond: 0.35e9,
  linkBytesPerSecond: 12.5e9,
  gpusPerNode: 8,
  bufferNodeBytes: 1.5 * 2 ** 40,
  sources: {
    producerTokensPerSecond: "H200, PyTorch bf16: Llama-3.1-8B cut after block 15 ran 78k tok/s; the whole 32-block model at half that",
    trainerTokensPerSecond: "H200, PyTorch TopK step at B=4096: 22.5 ms at 32768 latents, 72.4 ms at 131072 (d=4096)",
    bufferBytesPerSecond: "buffer bench, push+serve of 8 KiB rows over gRPC on loopback, 2 cores: ~40k rows/s in and out",
    linkBytesPerSecond: "assumed: a 100 Gb/s pod network link per node",
    gpusPerNode: "assumed: 8-GPU nodes",
    bufferNodeBytes: "assumed: 1.5 TiB of memory on a buffer node",
  },
};

/** A rates file: any subset of the rates, overriding the defaults (YAML or JSON). */
const RatesFile = z
  .object({
    producerTokensPerSecond: z.number().positive(),
    trainerTokensPerSecond: z.record(z.string().regex(/^\d+$/), z.number().positive()),
    bufferBytesPerSecond: z.number().positive(),
    linkBytesPerSecond: z.number().positive(),
    gpusPerNode: z.number().int().positive(),
    bufferNodeBytes: z.number().positive(),
  })
  .partial()
  .strict();

export function ratesFromFile(path: string, base: Rates = DEFAULT_RATES): Rates {
  const parsed = RatesFile.safeParse(parseYaml(readFileSync(path, "utf8")));
  if (!parsed.success) {
    throw new Error(`${path}: ${parsed.error.issues.map((i) => `${i.path.join(".") || "(root)"}: ${i.message}`).join("; ")}`);
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
  const lines = readFileSync(path, "utf8").trim().split("\n");
  const figures = JSON.parse(lines[lines.length - 1]!) as Record<string, number | string>;
  const out: Rates = { ...base, sources: { ...base.sources }, trainerTokensPerSecond: { ...base.trainerTokensPerSecond } };
  const num = (key: string) => (typeof figures[key] === "number" ? (figures[key] as number) : undefined);
  const rows = num("buffer.e2e_8192b_rows_per_s");
  if (rows) {
    out.bufferBytesPerSecond = rows * 8192;
    out.sources.bufferBytesPerSecond = `${path}: buffer.e2e_8192b_rows_per_s on ${figures.cores} cores`;
  }
  // The trainer's GPU step with bf16 batches, as a Llama Scope run feeds it; only from a run on a GPU.
  if (figures["trainer-gpu.gpu"] === 1) {
    for (const [key, value] of Object.entries(figures)) {
      const m = /^trainer-gpu\.d\d+_n(\d+)_k\d+_b\d+_bf16_step_tok_s$/.exec(key);
      if (!m || typeof value !== "number") continue;
      out.trainerTokensPerSecond[Number(m[1])] = value;
      out.sources.trainerTokensPerSecond = `${path}: trainer-gpu on ${figures["trainer-gpu.device"]}`;
    }
  }
  return out;
}
