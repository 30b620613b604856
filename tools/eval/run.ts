import { existsSync } from "node:fs";
import { join, resolve } from "node:path";
import type { RunConfig } from "../../services/common/config/index.js";
import { writeAtomic } from "../../services/common/safetensors.js";
import { saeFolder, saeFolders } from "../../services/common/sae-folders.js";
import { CFG_FILE } from "../../services/trainer/export.js";
import { corpusContexts } from "./contexts.js";
import { evaluateSplice, type SpliceResult } from "./splice.js";

export const EVAL_FILE = "eval.json";

/** Where the trainer exports an SAE: sae_lens in its folder (services/common/sae-folders.ts). */
export const exportDir = (saeDir: string): string => join(saeDir, "sae_lens");

export interface EvaluateRunOptions {
  /** Folder relative config paths (producer.model, dataset, tokenizer) resolve from; default the working folder. */
  root?: string;
  /** Progress lines. */
  log?: (line: string) => void;
}

/** Rows as `npx tsx tools/eval/main.ts` and `saeflow up` print them. */
export function evalTable(rows: readonly SpliceResult[]): string {
  const head = ["sae", "hook", "L_orig", "L_sae", "L_zero", "ΔL", "recovered", "KL", "cos", "rrb", "EV", "L0", "tokens"];
  const fmt = (v: number, digits: number) => (Number.isFinite(v) ? v.toFixed(digits) : "-");
  const body = rows.map((r) => [
    r.sae,
    r.hook,
    fmt(r.lm_loss_original, 4),
    fmt(r.lm_loss_sae, 4),
    fmt(r.lm_loss_zero, 4),
    fmt(r.delta_lm_loss, 4),
    fmt(r.fraction_loss_recovered, 3),
    fmt(r.kl_divergence, 4),
    fmt(r.cosine_similarity, 3),
    fmt(r.relative_reconstruction_bias, 3),
    fmt(r.explained_variance, 3),
    fmt(r.l0, 1),
    String(r.tokens),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((row) => row[i]!.length)));
  return [head, ...body]
    .map((row) => row.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join("  "))
    .join("\n");
}

/** Writes the rows to `path` as a JSON array, replacing any earlier file whole. */
export function writeEval(path: string, rows: readonly SpliceResult[]): void {
  writeAtomic(path, [Buffer.from(`${JSON.stringify(rows, null, 2)}\n`)]);
}

/**
 * The splice evaluation of a finished run: every SAE of `config.trainer.saes` that has an export
 * in `runDir`, on `launch.evalContexts` contexts of the run's own dataset, tokenizer and packing.
 * Writes runDir/eval.json (rows named by SAE) and returns the rows.
 */
export async function evaluateRun(runDir: string, config: RunConfig, options: EvaluateRunOptions = {}): Promise<SpliceResult[]> {
  const log = options.log ?? (() => undefined);
  const root = options.root ?? process.cwd();
  const p = config.producer;
  // With several hook points, an SAE is named by its hook point too.
  const label = (s: { hook: string; name: string }) => (config.trainer.hookPoints.length > 1 ? `${s.hook}/${s.name}` : s.name);
  const all = saeFolders(runDir, config.trainer);
  const found = all.filter((s) => existsSync(join(exportDir(s.dir), CFG_FILE)));
  const missing = all.filter((s) => !found.includes(s)).map(label);
  if (found.length === 0)
    throw new Error(
      `no SAE of the run has an export in ${runDir} (expected ${exportDir(saeFolder(runDir, config.trainer, "<hook point>", "<sae name>"))}/${CFG_FILE})`,
    );
  if (missing.length) log(`eval: no export for ${missing.join(", ")}; evaluating the others`);
  const names = found.map(label);
  const fromRoot = (path: string) => (path.startsWith("builtin:") ? path : resolve(root, path));
  const { contexts, bosId } = await corpusContexts(
    { ...p, dataset: p.dataset.map(fromRoot), tokenizer: fromRoot(p.tokenizer) },
    config.launch.evalContexts,
    { log },
  );
  log(`eval: ${names.length} SAE(s) on ${contexts.length} contexts of ${p.contextLength} tokens`);
  const rows = await evaluateSplice({
    modelPath: fromRoot(p.model),
    saeDirs: found.map((s) => exportDir(s.dir)),
    contexts,
    bosId: bosId ?? null,
    provider: p.executionProvider,
    threads: p.threads,
    onContext: (done, total) => log(`eval: context ${done}/${total}`),
  });
  const named = rows.map((row, i) => ({ ...row, sae: names[i]! }));
  writeEval(join(runDir, EVAL_FILE), named);
  return named;
}
