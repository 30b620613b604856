import { join } from "node:path";
import type { TrainerConfig } from "./config/index.js";

/**
 * Where SAE `name` of hook point `hook` lives in a run folder: `<run dir>/<name>` when the run trains
 * one hook point (as every single-hook run always has), `<run dir>/<hook>/<name>` when it trains
 * several, whichever trainer process trained it. The trainer writes there; export, evaluation and the
 * report read from there.
 */
export function saeFolder(runDir: string, trainer: Pick<TrainerConfig, "hookPoints">, hook: string, name: string): string {
  return join(hookFolder(runDir, trainer, hook), name);
}

/** The folder holding a hook point's sweep: the run folder itself, or `<run dir>/<hook>` when the run trains several. */
export function hookFolder(runDir: string, trainer: Pick<TrainerConfig, "hookPoints">, hook: string): string {
  return trainer.hookPoints.length === 1 ? runDir : join(runDir, hook);
}

/** Every SAE of the run: each hook point's sweep, with its folder. */
export function saeFolders(
  runDir: string,
  trainer: Pick<TrainerConfig, "hookPoints" | "saes">,
): Array<{ hook: string; name: string; dir: string }> {
  return trainer.hookPoints.flatMap((hook) =>
    trainer.saes.map(({ name }) => ({ hook, name, dir: saeFolder(runDir, trainer, hook, name) })),
  );
}
