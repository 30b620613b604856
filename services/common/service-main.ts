import { parseArgs } from "node:util";
import { ConfigError, loadConfig, type RunConfig } from "./config/index.js";
import { startTelemetry } from "./telemetry.js";

/**
 * The process entry every role shares: `tsx services/<role>/main.ts --config FILE [--set k=v ...]`.
 * Loads and validates the config (exit 2 naming the bad key), installs telemetry, starts the role,
 * and on SIGINT/SIGTERM or when the role finishes stops it and flushes telemetry before exiting.
 */
export interface RunningRole {
  /** Human-readable line printed once started. */
  banner: string;
  /** Settles when the role has finished its work by itself (rejects on failure). */
  finished: Promise<void>;
  /** Stops the role cleanly; resolves when it is really stopped. */
  stop(): Promise<void>;
}

export async function serviceMain(
  role: string,
  start: (config: RunConfig) => Promise<RunningRole>,
  attributes: (c: RunConfig) => Record<string, string> = () => ({}),
): Promise<never> {
  const { values } = parseArgs({
    options: { config: { type: "string" }, set: { type: "string", multiple: true, default: [] } },
    strict: true,
  });
  let config: RunConfig;
  try {
    config = loadConfig({ file: values.config, env: process.env, sets: values.set });
  } catch (err) {
    process.stderr.write(`${role}: ${(err as Error).message}\n`);
    process.exit(2);
  }
  const telemetry = startTelemetry({
    serviceName: `saeflow-${role}`,
    endpoint: config.telemetry.otlpEndpoint,
    metricsIntervalMs: config.telemetry.metricsIntervalMs,
    attributes: { "saeflow.run_id": config.run.id, ...attributes(config) },
  });
  let running: RunningRole;
  try {
    running = await start(config);
  } catch (err) {
    process.stderr.write(`${role}: ${err instanceof ConfigError ? err.message : ((err as Error).stack ?? String(err))}\n`);
    await telemetry.shutdown();
    process.exit(err instanceof ConfigError ? 2 : 1);
  }
  process.stderr.write(`${role}: ${running.banner}\n`);
  let code = 0;
  const signalled = new Promise<void>((resolve) => {
    for (const signal of ["SIGINT", "SIGTERM"] as const) process.once(signal, () => resolve());
  });
  await Promise.race([
    signalled,
    running.finished.catch((err: unknown) => {
      process.stderr.write(`${role}: ${(err as Error).stack ?? String(err)}\n`);
      code = 1;
    }),
  ]);
  await running.stop();
  await telemetry.shutdown();
  process.exit(code);
}
