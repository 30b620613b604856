import { Worker } from "node:worker_threads";
import { ConfigError } from "./config/index.js";

/**
 * A worker running `name`, a module beside `caller` (its import.meta.url). Under tsx (the sources
 * run as TypeScript) the worker registers tsx's loader first, since a worker thread does not inherit
 * the parent's.
 */
export function startWorker(caller: string, name: string, workerData: unknown): Worker {
  const url = new URL(`./${name}${caller.endsWith(".ts") ? ".ts" : ".js"}`, caller);
  if (url.pathname.endsWith(".js")) return new Worker(url, { workerData });
  const boot = `import { register } from ${JSON.stringify(import.meta.resolve("tsx/esm/api"))};\nregister();\nawait import(${JSON.stringify(url.href)});`;
  return new Worker(new URL(`data:text/javascript,${encodeURIComponent(boot)}`), { workerData });
}

/** An error crossing between threads: a config error keeps its key, a gRPC error its code. */
export interface WireError {
  message: string;
  key?: string;
  rawMessage?: string;
  code?: number;
}

/** `err` as it crosses to another thread. */
export function wireError(err: unknown): WireError {
  if (err instanceof ConfigError && err.issues.length === 1)
    return { message: err.message, key: err.issues[0]!.key, rawMessage: err.issues[0]!.message };
  const { message, code } = err as Error & { code?: unknown };
  return { message, ...(typeof code === "number" ? { code } : {}) };
}

/** The error a WireError stands for, on the thread it reached. */
export function unwireError(e: WireError): Error {
  if (e.key !== undefined && e.rawMessage !== undefined) return ConfigError.at(e.key, e.rawMessage);
  return Object.assign(new Error(e.message), e.code === undefined ? {} : { code: e.code });
}
