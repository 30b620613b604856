import { parseArgs } from "node:util";
import { ConfigError, loadConfig, type RunConfig } from "./config/index.js";
import type { Role, RoleDeps } from "./role.js";
import { startTelemetry } from "./telemetry.js";

/**
 * The process entry of every role: `tsx services/<role>/main.ts --config FILE [--set k=v ...]`.
 * Loads and validates the config (exit 2 naming the bad key), installs telemetry, starts the role,
 * and on SIGINT/SIGTERM or when the role finishes stops it and flushes telemetry before exiting:
 * 0 when the role finished its work, 1 when an error ended it.
 */
export async function serviceMain(
  role: string,
  start: (config: RunConfig, deps: RoleDeps) => Promise<Role<unknown>>,
  attributes: (c: RunConfig) => Record<string, string> = () => ({}),
): Promise<never> {
  const log = (line: string) => void process.stderr.write(`${role}: ${line}\n`);
  let config: RunConfig;
  try {
    const { values } = parseArgs({
      options: { config: { type: "string" }, set: { type: "string", multiple: true, default: [] } },
      strict: true,
    });
    config = loadConfig({ file: values.config, env: process.env, sets: values.set });
  } catch (err) {
    log((err as Error).message);
    process.exit(2);
  }
  const telemetry = startTelemetry({
    serviceName: `saeflow-${role}`,
    endpoint: config.telemetry.otlpEndpoint,
    metricsIntervalMs: config.telemetry.metricsIntervalMs,
    attributes: { "saeflow.run_id": config.run.id, ...attributes(config) },
  });
  let running: Role<unknown>;
  try {
    running = await start(config, { log });
  } catch (err) {
    log(err instanceof ConfigError ? err.message : ((err as Error).stack ?? String(err)));
    await telemetry.shutdown();
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  const signalled = new Promise<undefined>((resolve) => {
    for (const signal of ["SIGINT", "SIGTERM"] as const) process.once(signal, () => resolve(undefined));
  });
  const failure = await Promise.race([signalled, running.finished]);
  if (failure) log(failure instanceof ConfigError ? failure.message : (failure.stack ?? failure.message));
  await running.stop();
  await telemetry.shutdown();
  process.exit(failure ? (failure instanceof ConfigError ? 2 : 1) : 0);
}
