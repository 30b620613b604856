import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, join, relative, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { ROLE_ENV } from "../../tools/cli/role-env.js";

/**
 * What the image relies on, checked from the sources in a moment: it installs production dependencies
 * only and copies services/ alone, its base images are build arguments, and its two targets run as
 * the user the chart's pods demand. image-run.test.ts builds it and runs a whole run out of it.
 */

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { dependencies: Record<string, string> };

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

const SPECIFIER =
  /(?:^|\s)(?:import|export)\s[^"';]*?from\s+["']([^"']+)["']|import\s*\(\s*["']([^"']+)["']\s*\)|^import\s+["']([^"']+)["']/gm;

test("services/ imports only production dependencies, Node builtins and files inside services/", () => {
  const services = join(ROOT, "services");
  const bad: string[] = [];
  const used = new Set<string>();
  for (const file of sources(services)) {
    for (const m of readFileSync(file, "utf8").matchAll(SPECIFIER)) {
      const spec = (m[1] ?? m[2] ?? m[3])!;
      const where = `${relative(ROOT, file)}: ${spec}`;
      if (spec.startsWith(".")) {
        if (relative(services, resolve(dirname(file), spec)).startsWith("..")) bad.push(`${where} (outside services/, not in the image)`);
      } else if (!spec.startsWith("node:") && !builtinModules.includes(spec)) {
        const name = spec.startsWith("@") ? spec.split("/").slice(0, 2).join("/") : spec.split("/")[0]!;
        used.add(name);
        if (!(name in pkg.dependencies)) bad.push(`${where} (${name} is not a production dependency; npm ci --omit=dev leaves it out)`);
      }
    }
  }
  assert.deepEqual(bad, []);
  for (const core of ["@grpc/grpc-js", "@bufbuild/protobuf", "onnxruntime-node", "zod"])
    assert.ok(used.has(core), `no import of ${core} was seen`);
});

test("the Dockerfile's cpu and cuda targets run tsx as the non-root user the chart's pods require", () => {
  const dockerfile = readFileSync(join(ROOT, "deploy/docker/Dockerfile"), "utf8");
  const stages = dockerfile.split(/^FROM /m).slice(1);
  const stage = (name: string) => stages.find((s) => new RegExp(`^\\S+ AS ${name}\\n`).test(s));
  const helpers = readFileSync(join(ROOT, "deploy/helm/saeflow/templates/_helpers.tpl"), "utf8");
  const uid = /runAsUser: (\d+)/.exec(helpers)?.[1];
  assert.ok(uid, "the chart sets runAsUser");
  for (const name of ["cpu", "cuda"]) {
    const s = stage(name);
    assert.ok(s, `no stage ${name}`);
    assert.match(s, new RegExp(`^USER ${uid}:${uid}$`, "m"), name);
    assert.match(s, /^ENTRYPOINT \["tini", "--", "node", "--import", "tsx"\]$/m, name);
    assert.match(s, /^COPY services services$/m, name);
  }
  assert.match(dockerfile, /ONNXRUNTIME_NODE_INSTALL=skip npm ci --omit=dev/);
  assert.match(dockerfile, /^COPY package\.json package-lock\.json tsconfig\.json \.\/$/m, "builtin:corpus reads package-lock.json");
  assert.match(dockerfile, /ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules\/onnxruntime-node\/script\/install\.js/);
  assert.ok("tsx" in pkg.dependencies, "tsx runs the services in the image, so it is a production dependency");
});

test("the Dockerfile's base images are build arguments defaulting to the official images", () => {
  const dockerfile = readFileSync(join(ROOT, "deploy/docker/Dockerfile"), "utf8");
  const args = Object.fromEntries([...dockerfile.matchAll(/^ARG (\w+)=(\S+)$/gm)].map((m) => [m[1]!, m[2]!]));
  assert.deepEqual(args, {
    NODE_IMAGE: "node:20-bookworm-slim",
    CPU_IMAGE: "debian:bookworm-slim",
    CUDA_IMAGE: "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
  });
  // Every FROM names an argument or an earlier stage, so a build on other bases builds the same layers.
  const stages: string[] = [];
  for (const [, base, name] of dockerfile.matchAll(/^FROM (\S+) AS (\S+)$/gm)) {
    const arg = /^\$\{(\w+)\}$/.exec(base!)?.[1];
    assert.ok(arg ? arg in args : stages.includes(base!), `FROM ${base} AS ${name}`);
    stages.push(name!);
  }
  assert.deepEqual(stages.slice(-2), ["cuda", "cpu"], "cpu is the last stage, the default target");
});

test(".dockerignore lets into the build context what the Dockerfile copies, and nothing else", () => {
  const dockerfile = readFileSync(join(ROOT, "deploy/docker/Dockerfile"), "utf8");
  const copied = [...dockerfile.matchAll(/^COPY (?!--from)(.+) \S+$/gm)].flatMap((m) => m[1]!.split(" "));
  const rules = readFileSync(join(ROOT, ".dockerignore"), "utf8")
    .split("\n")
    .filter((l) => l && !l.startsWith("#"));
  assert.equal(rules[0], "*", "everything is left out first");
  const allowed = rules.slice(1).map((r) => r.replace(/^!/, "").replace(/\/$/, ""));
  assert.deepEqual([...new Set(copied)].sort(), [...allowed].sort());
});

test("the image sets the environment every role process runs with (tools/cli/role-env.ts)", () => {
  const dockerfile = readFileSync(join(ROOT, "deploy/docker/Dockerfile"), "utf8");
  const stages = dockerfile.split(/^FROM /m).slice(1);
  for (const name of ["cpu", "cuda"]) {
    const stage = stages.find((s) => new RegExp(`^\\S+ AS ${name}\\n`).test(s));
    assert.ok(stage, `no stage ${name}`);
    for (const [key, value] of Object.entries(ROLE_ENV))
      assert.match(stage, new RegExp(`^ENV .*\\b${key}=${value}\\b`, "m"), `${name}: ${key}`);
  }
});
