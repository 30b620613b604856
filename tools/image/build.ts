import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { exec, type Exited } from "./exec.js";
import { type BaseImages, localBases, type Log, ROOT } from "./local-base.js";
import { LOCAL_PREFIX, pruneLocalImages } from "./prune.js";
import { formatSize, sizeReport } from "./size.js";

/**
 * Builds a target of deploy/docker/Dockerfile with buildah (no Docker engine, no registry): on the
 * local Debian and node bases by default, or on any base images given as build arguments.
 *
 *   npx tsx tools/image/build.ts [--target cpu|cuda] [--tag NAME] [--size]
 */

export const DOCKERFILE = join(ROOT, "deploy/docker/Dockerfile");
export type Target = "cpu" | "cuda";

export interface BuildOptions {
  target: Target;
  tag: string;
  bases: BaseImages;
  timeoutMs: number;
  log?: Log;
}

export interface Built extends Exited {
  /** The image id, when the build succeeded. */
  id?: string;
}

/** The dependency stage's tag: see buildTarget. */
export const DEPS_TAG = `${LOCAL_PREFIX}deps:latest`;

/**
 * `buildah bud` of one target with the layer cache (an unchanged package-lock.json reuses the
 * installed dependencies) and chroot isolation (RUN steps share the host's network, which reaches the
 * npm registry and the Debian mirror). The deps stage is built first under a tag of its own: no
 * target image descends from it, so its cached layers would otherwise look unused to
 * pruneLocalImages, which then removes what no image needs any more.
 */
export async function buildTarget(options: BuildOptions): Promise<Built> {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-build-"));
  const deadline = Date.now() + options.timeoutMs;
  const bud = async (target: string, tag: string): Promise<Built> => {
    const iidfile = join(dir, `${target}.iid`);
    const args = ["bud", "--isolation", "chroot", "--layers", "--force-rm", "--pull=never", "-f", DOCKERFILE, "--target", target];
    for (const [k, v] of Object.entries(options.bases)) args.push("--build-arg", `${k}=${v}`);
    args.push("--iidfile", iidfile, "-t", tag, ROOT);
    options.log?.(`buildah ${args.join(" ")}`);
    const r: Built = await exec("buildah", args, { timeoutMs: Math.max(1, deadline - Date.now()) });
    if (r.code === 0)
      r.id = readFileSync(iidfile, "utf8")
        .trim()
        .replace(/^sha256:/, "");
    return r;
  };
  try {
    const deps = await bud("deps", DEPS_TAG);
    if (deps.code !== 0) return deps;
    const r = await bud(options.target, options.tag);
    r.output = deps.output + r.output;
    if (r.code === 0) await pruneLocalImages([...Object.values(options.bases), DEPS_TAG]);
    return r;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { target: { type: "string", default: "cpu" }, tag: { type: "string" }, size: { type: "boolean", default: false } },
    strict: true,
  });
  const target = values.target as Target;
  if (target !== "cpu" && target !== "cuda") throw new Error(`--target: ${values.target}, expected cpu or cuda`);
  const tag = values.tag ?? `localhost/saeflow:${target}`;
  const log = (line: string) => void process.stderr.write(`image: ${line}\n`);
  const started = Date.now();
  const bases = await localBases(log);
  const built = await buildTarget({ target, tag, bases, timeoutMs: 1_800_000, log });
  process.stderr.write(built.output);
  if (built.code !== 0) process.exit(1);
  log(`${tag} built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  if (values.size) process.stdout.write(formatSize(await sizeReport(tag)));
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
