import { mkdirSync, renameSync, writeFileSync } from "node:fs";
import { Socket } from "node:net";
import { dirname } from "node:path";
import { parseArgs } from "node:util";
import { createRegistry, isMessage, type Message, toJson } from "@bufbuild/protobuf";
import { StatusResponseSchema as BufferStatus } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { StatusResponseSchema as ProducerStatus } from "../gen/saeflow/producer/v1/producer_pb.js";
import { StatusResponseSchema as TrainerStatus } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import { ConfigError, loadConfig, type RunConfig } from "./config/index.js";
import type { Role, RoleDeps } from "./role.js";
import { startTelemetry } from "./telemetry.js";

/**
 * Set by a launcher (saeflow up) to the number of a pipe it holds open for the role's lifetime: when
 * the pipe closes, the launcher is gone (even SIGKILLed), and the role stops as on SIGTERM.
 */
export const PARENT_FD_ENV = "SAEFLOW_PARENT_FD";
/** Set by a launcher to a path where the role writes its last Status (protobuf JSON) when it exits. */
export const STATUS_FILE_ENV = "SAEFLOW_STATUS_FILE";
/** How long a role whose launcher is gone may take to stop cleanly before it exits regardless. */
const ORPHAN_GRACE_MS = 30_000;

/**
 * The process entry of every role: `tsx services/<role>/main.ts --config FILE [--set k=v ...]`.
 * Loads and validates the config (exit 2 naming the bad key), installs telemetry, starts the role,
 * and on SIGINT/SIGTERM, when its launcher goes away, or when the role finishes stops it and flushes
 * telemetry before exiting: 0 when the role finished its work, 1 when an error ended it.
 */
export async function serviceMain(
  role: string,
  start: (config: RunConfig, deps: RoleDeps) => Promise<Role<unknown>>,
  attributes: (c: RunConfig) => Record<string, string> = () => ({}),
): Promise<never> {
  const log = (line: string) => void process.stderr.write(`${role}: ${line}\n`);
  const orphaned = watchLauncher(log);
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
    void orphaned.then(() => resolve(undefined));
  });
  const failure = await Promise.race([signalled, running.finished]);
  if (failure) log(failure instanceof ConfigError ? failure.message : (failure.stack ?? failure.message));
  await running.stop();
  writeLastStatus(running, log);
  await telemetry.shutdown();
  process.exit(failure ? (failure instanceof ConfigError ? 2 : 1) : 0);
}

/**
 * Resolves when the launcher's pipe (PARENT_FD_ENV) closes; never when there is none. From then on
 * the role has ORPHAN_GRACE_MS to stop cleanly (a trainer checkpoints) before it exits regardless.
 */
function watchLauncher(log: (line: string) => void): Promise<void> {
  const fd = Number(process.env[PARENT_FD_ENV]);
  if (!Number.isInteger(fd) || fd < 3) return new Promise(() => undefined);
  let pipe: Socket;
  try {
    pipe = new Socket({ fd, readable: true, writable: false });
  } catch (err) {
    log(`${PARENT_FD_ENV}=${fd} is not a pipe (${(err as Error).message}); not watching the launcher`);
    return new Promise(() => undefined);
  }
  return new Promise((resolve) => {
    const gone = () => {
      log("the launcher went away; stopping");
      setTimeout(() => process.exit(1), ORPHAN_GRACE_MS).unref();
      resolve();
    };
    pipe.once("end", gone);
    pipe.once("error", gone);
    pipe.resume();
    // The pipe alone must not keep a finished role alive.
    pipe.unref();
  });
}

const statuses = createRegistry(BufferStatus, ProducerStatus, TrainerStatus);

/** Writes the role's last Status where its launcher asked (STATUS_FILE_ENV), so the run's final status outlives the process. */
function writeLastStatus(running: Role<unknown>, log: (line: string) => void): void {
  const path = process.env[STATUS_FILE_ENV];
  const status = running.status();
  if (!path || !isMessage(status)) return;
  const schema = statuses.getMessage((status as Message).$typeName);
  if (!schema) return;
  try {
    mkdirSync(dirname(path), { recursive: true });
    writeFileSync(`${path}.tmp`, `${JSON.stringify({ at: new Date().toISOString(), status: toJson(schema, status) })}\n`);
    renameSync(`${path}.tmp`, path);
  } catch (err) {
    log(`last status not written to ${path}: ${(err as Error).message}`);
  }
}
