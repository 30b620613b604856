import { readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";

const Identity = z.object({ cert: z.string(), key: z.string() });

/**
 * run.json in the run folder: where each service of a local run listens, so `saeflow status`,
 * `stop` and `export` find them from the run folder alone, and for a TLS run the certificates
 * they (and grpcurl) call with.
 */
export const RunFile = z.object({
  runId: z.string(),
  config: z.string().describe("The resolved run.yaml every process read."),
  natsUrl: z.string(),
  natsPid: z.number().int().optional().describe("The nats-server saeflow up started (and supervises), if it started one."),
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
  buffers: z
    .array(z.object({ id: z.string(), shard: z.number().int(), address: z.string(), hookPoints: z.array(z.string()) }))
    .default([])
    .describe("The run's buffer processes, one per shard, and the pools each holds."),
  tls: z
    .object({
      ca: z.string().describe("The run's CA: grpcurl -cacert."),
      serverName: z.string().describe("The name in every server's certificate: grpcurl -authority."),
      operator: Identity.describe("The operator's certificate: grpcurl -cert/-key; status and stop call with it."),
      exporter: Identity.describe("A trainer identity: export pulls calibration batches with it."),
    })
    .optional()
    .describe("Set by saeflow up --tls: every server wants a client certificate signed by ca."),
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

/**
 * The run's config as the CLI calls with: run.yaml, plus for a TLS run the certificate of `who`
 * (run.yaml names the CA; each process of the run adds its own certificate).
 */
export function cliConfig(run: RunFile, who: "operator" | "exporter" = "operator"): RunConfig {
  const id = run.tls?.[who];
  return loadConfig({ file: run.config, sets: id ? [`transport.tls.cert=${id.cert}`, `transport.tls.key=${id.key}`] : [] });
}
