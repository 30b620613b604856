import { readFileSync } from "node:fs";
import { parse as parseYaml } from "yaml";
import type { z } from "zod";
import { ConfigError, type ConfigIssue } from "./error.js";
import { type RunConfig, RunConfigSchema } from "./schema.js";

export { ConfigError, type ConfigIssue };

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
type Node = Tree | unknown[];
const isTree = (v: unknown): v is Tree => typeof v === "object" && v !== null && !Array.isArray(v);
const isIndex = (key: string): boolean => /^(0|[1-9]\d*)$/.test(key);

/** Every default, so a path into a list the file never wrote (trainer.saes.0.k) starts from the default list. */
let defaultsCache: Tree | undefined;
function defaults(): Tree {
  defaultsCache ??= RunConfigSchema.parse({}) as unknown as Tree;
  return defaultsCache;
}

function defaultAt(path: string[]): unknown {
  let node: unknown = defaults();
  for (const key of path) node = isTree(node) || Array.isArray(node) ? (node as Record<string, unknown>)[key] : undefined;
  return node === undefined ? undefined : structuredClone(node);
}

/**
 * Sets `path` in `tree`. A numeric segment addresses an element of a list (the file's, or the
 * default list when the file has none); one past the end appends, further is refused.
 */
function setPath(tree: Tree, path: string[], value: unknown, source: string): void {
  let node: Node = tree;
  path.forEach((key, depth) => {
    const last = depth === path.length - 1;
    const where = path.slice(0, depth + 1).join(".");
    if (Array.isArray(node)) {
      if (!isIndex(key)) throw ConfigError.at(where, `${path.slice(0, depth).join(".")} is a list; address its elements by index`, source);
      const index = Number(key);
      if (index > node.length) throw ConfigError.at(where, `index ${index} is past the end of a list of ${node.length}`, source);
      if (last) node[index] = value;
      else node = node[index] = childOf(node[index], path[depth + 1]!, path.slice(0, depth + 1));
      return;
    }
    const tree: Tree = node;
    if (last) tree[key] = value;
    else node = tree[key] = childOf(tree[key], path[depth + 1]!, path.slice(0, depth + 1));
  });
}

/** The node to descend into at `at`: what is there, else the default there, else a fresh list or mapping. */
function childOf(existing: unknown, nextKey: string, at: string[]): Node {
  if (isTree(existing) || Array.isArray(existing)) return existing;
  const fallback = defaultAt(at);
  if (isTree(fallback) || Array.isArray(fallback)) return fallback;
  return isIndex(nextKey) ? [] : {};
}

const camel = (snake: string): string => snake.toLowerCase().replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());

/** SAEFLOW_BUFFER__CAPACITY_ROWS=1024 sets buffer.capacityRows, SAEFLOW_TRAINER__SAES__0__K=4 one SAE's k: `__` separates levels. */
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

/** The schema node at `path`, through defaults, optionals, pipes, objects and list elements; undefined off the schema. */
function schemaAt(path: string[]): z.core.$ZodType | undefined {
  let node: z.core.$ZodType | undefined = RunConfigSchema;
  for (const key of path) {
    node = unwrap(node);
    const def = node?._zod.def as { type: string; shape?: Record<string, z.core.$ZodType>; element?: z.core.$ZodType } | undefined;
    if (def?.type === "object") node = def.shape?.[key];
    else if (def?.type === "array" && isIndex(key)) node = def.element;
    else return undefined;
  }
  return unwrap(node);
}

function unwrap(node: z.core.$ZodType | undefined): z.core.$ZodType | undefined {
  for (;;) {
    const def = node?._zod.def as { type: string; innerType?: z.core.$ZodType; in?: z.core.$ZodType } | undefined;
    if (!def) return node;
    if (def.type === "default" || def.type === "prefault" || def.type === "optional" || def.type === "nullable") node = def.innerType;
    else if (def.type === "pipe") node = def.in;
    else return node;
  }
}

/**
 * A flag's or variable's text as the value of `path`: kept as text where the schema wants a string
 * (a password 0123 stays "0123"; YAML quotes around it are still taken off), read as a YAML scalar
 * or list elsewhere ("1024", "[a, b]").
 */
function parseValue(path: string[], raw: string): unknown {
  if (schemaAt(path)?._zod.def.type === "string") return /^(["']).*\1$/s.test(raw) ? String(parseYaml(raw)) : raw;
  try {
    return parseYaml(raw) ?? raw;
  } catch {
    return raw;
  }
}

/** Where the value at `key` came from: the most specific env or --set override, else the file when it holds the key. */
function sourceOf(key: string, sources: Map<string, string>, file: FileSource | undefined): string | undefined {
  for (let k = key; k; k = k.includes(".") ? k.slice(0, k.lastIndexOf(".")) : "") {
    const s = sources.get(k);
    if (s) return s;
  }
  let node: unknown = file?.doc;
  for (const part of key.split(".")) node = isTree(node) || Array.isArray(node) ? (node as Record<string, unknown>)[part] : undefined;
  return node === undefined ? undefined : file?.path;
}

interface FileSource {
  path: string;
  doc: Tree;
}

function describeIssues(issues: z.core.$ZodIssue[], sources: Map<string, string>, file: FileSource | undefined): ConfigError {
  const out: ConfigIssue[] = [];
  for (const issue of issues) {
    const key = issue.path.map(String).join(".") || "(root)";
    const source = sourceOf(key, sources, file);
    if (issue.code === "unrecognized_keys") {
      for (const k of issue.keys)
        out.push({ key: key === "(root)" ? k : `${key}.${k}`, message: "unknown key", ...(source ? { source } : {}) });
    } else {
      out.push({ key, message: issue.message, ...(source ? { source } : {}) });
    }
  }
  return new ConfigError(out);
}

function readFile(file: string): Tree {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw ConfigError.at("(file)", `cannot read config file ${file}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text) ?? {};
  } catch (err) {
    throw ConfigError.at("(file)", `config file ${file} is not valid YAML: ${(err as Error).message}`);
  }
  if (!isTree(doc)) throw ConfigError.at("(root)", `config file ${file} must hold a mapping at the top`);
  return doc;
}

/** Loads the run config: defaults < YAML file < environment < --set flags, validated once. */
export function loadConfig(options: LoadOptions = {}): RunConfig {
  let tree: Tree = {};
  const sources = new Map<string, string>();
  if (options.base !== undefined) {
    if (!isTree(options.base)) throw ConfigError.at("(root)", "the document must be a mapping");
    tree = structuredClone(options.base);
  }
  const file = options.file ? { path: options.file, doc: readFile(options.file) } : undefined;
  if (file) tree = { ...tree, ...structuredClone(file.doc) };
  for (const [path, raw, source] of envOverrides(options.env ?? {})) {
    setPath(tree, path, parseValue(path, raw), source);
    sources.set(path.join("."), source);
  }
  for (const set of options.sets ?? []) {
    const eq = set.indexOf("=");
    if (eq <= 0) throw ConfigError.at("--set", `"${set}" is not key.path=value`);
    const key = set.slice(0, eq);
    const path = key.split(".");
    setPath(tree, path, parseValue(path, set.slice(eq + 1)), `--set ${key}`);
    sources.set(key, `--set ${key}`);
  }
  const parsed = RunConfigSchema.safeParse(tree);
  if (!parsed.success) throw describeIssues(parsed.error.issues, sources, file);
  return parsed.data;
}
