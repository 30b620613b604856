import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";

/**
 * run.json in the run folder: where each service of a local run listens, so `saeflow status`,
 * `stop` and `export` find them from the run folder alone.
 */
export const RunFile = z.object({
  runId: z.string(),
  config: z.string().describe("The resolved run.yaml every process read."),
  natsUrl: z.string(),
  startedAt: z.string(),
  services: z.array(
    z.object({
      id: z.string(),
      role: z.enum(["buffer", "producer", "trainer"]),
      address: z.string(),
      pid: z.number().int(),
      log: z.string(),
    }),
  ),
});
export type RunFile = z.infer<typeof RunFile>;

export function writeRunFile(runDir: string, run: RunFile): void {
  const path = join(runDir, "run.json");
  writeFileSync(`${path}.tmp`, `${JSON.stringify(run, null, 2)}\n`);
  renameSync(`${path}.tmp`, path);
}

export function readRunFile(runDir: string): RunFile {
  const path = join(runDir, "run.json");
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch {
    throw new Error(`${path} not found: is ${runDir} a run folder made by \`saeflow up\`?`);
  }
  return RunFile.parse(JSON.parse(text));
}
