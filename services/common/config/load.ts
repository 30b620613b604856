import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import type { z } from "zod";
import { type RunConfig, RunConfigSchema } from "./schema.js";

/** A config that does not validate; `message` names every bad key with where its value came from. */
export class ConfigError extends Error {
  constructor(
    message: string,
    readonly keys: string[],
  ) {
    super(message);
    this.name = "ConfigError";
  }
}

export interface LoadOptions {
  /** YAML file; absent means defaults only. */
  file?: string;
  /** Environment to read SAEFLOW_* and the standard NATS_URL / OTEL_EXPORTER_OTLP_ENDPOINT from. */
  env?: NodeJS.ProcessEnv;
  /** `key.path=value` overrides from --set flags; values are parsed as YAML scalars or lists. */
  sets?: string[];
  /** An already-parsed object to start from instead of a file (tests, Helm-rendered configs). */
  base?: unknown;
}

type Tree = Record<string, unknown>;
const isTree = (v: unknown): v is Tree => typeof v === "object" && v !== null && !Array.isArray(v);

function setPath(tree: Tree, path: string[], value: unknown): void {
  let node = tree;
  for (const key of path.slice(0, -1)) {
    const next = node[key];
    if (!isTree(next)) node[key] = {};
    node = node[key] as Tree;
  }
  node[path[path.length - 1]!] = value;
}

const camel = (snake: string): string => snake.toLowerCase().replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** SAEFLOW_BUFFER__CAPACITY_ROWS=1024 sets buffer.capacityRows: `__` separates levels. */
function envOverrides(env: NodeJS.ProcessEnv): Array<[string[], string, string]> {
  const out: Array<[string[], string, string]> = [];
  for (const [name, value] of Object.entries(env)) {
    if (value === undefined) continue;
    if (name.startsWith("SAEFLOW_") && name.includes("__")) {
      out.push([name.slice("SAEFLOW_".length).split("__").map(camel), value, `env ${name}`]);
    }
  }
  if (env.NATS_URL) out.push([["nats", "url"], env.NATS_URL, "env NATS_URL"]);
  if (env.OTEL_EXPORTER_OTLP_ENDPOINT !== undefined) {
    out.push([["telemetry", "otlpEndpoint"], env.OTEL_EXPORTER_OTLP_ENDPOINT, "env OTEL_EXPORTER_OTLP_ENDPOINT"]);
  }
  return out;
}

function parseScalar(raw: string): unknown {
  try {
    return parseYaml(raw) ?? raw;
  } catch {
    return raw;
  }
}

function describeIssues(issues: z.core.$ZodIssue[], sources: Map<string, string>): ConfigError {
  const keys: string[] = [];
  const lines = issues.map((issue) => {
    const key = issue.path.map(String).join(".") || "(root)";
    const unknown = issue.code === "unrecognized_keys" ? issue.keys.map((k) => (key === "(root)" ? k : `${key}.${k}`)) : [];
    keys.push(...(unknown.length ? unknown : [key]));
    const from = sources.get(key);
    const named = unknown.length ? `${unknown.join(", ")}: unknown key` : `${key}: ${issue.message}`;
    return `  ${named}${from ? ` (from ${from})` : ""}`;
  });
  return new ConfigError(`invalid config:\n${lines.join("\n")}`, keys);
}

/** Loads the run config: defaults < YAML file < environment < --set flags, validated once. */
export function loadConfig(options: LoadOptions = {}): RunConfig {
  let tree: Tree = {};
  const sources = new Map<string, string>();
  if (options.base !== undefined) {
    if (!isTree(options.base)) throw new ConfigError("invalid config: the document must be a mapping", ["(root)"]);
    tree = structuredClone(options.base);
  }
  if (options.file) {
    let text: string;
    try {
      text = readFileSync(options.file, "utf8");
    } catch (err) {
      throw new ConfigError(`cannot read config file ${options.file}: ${(err as Error).message}`, ["(file)"]);
    }
    let doc: unknown;
    try {
      doc = parseYaml(text) ?? {};
    } catch (err) {
      throw new ConfigError(`config file ${options.file} is not valid YAML: ${(err as Error).message}`, ["(file)"]);
    }
    if (!isTree(doc)) throw new ConfigError(`config file ${options.file} must hold a mapping at the top`, ["(root)"]);
    tree = { ...tree, ...doc };
  }
  for (const [path, raw, source] of envOverrides(options.env ?? {})) {
    setPath(tree, path, parseScalar(raw));
    sources.set(path.join("."), source);
  }
  for (const set of options.sets ?? []) {
    const eq = set.indexOf("=");
    if (eq <= 0) throw new ConfigError(`--set ${set}: expected key.path=value`, ["--set"]);
    const key = set.slice(0, eq);
    setPath(tree, key.split("."), parseScalar(set.slice(eq + 1)));
    sources.set(key, `--set ${key}`);
  }
  const parsed = RunConfigSchema.safeParse(tree);
  if (!parsed.success) throw describeIssues(parsed.error.issues, sources);
  return parsed.data;
}
