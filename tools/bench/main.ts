import { spawnSync } from "node:child_process";
import { availableParallelism, cpus } from "node:os";
import { ROLE_ENV, roleEnv } from "../cli/role-env.js";

/**
 * `npm run bench` runs every benchmark; `npm run bench -- NAME [NAME...]` runs some. Each prints
 * its own lines, then this prints one JSON line holding every figure, ratios under keys ending in
 * `_ratio`, the core count, node's version and the CPU; each bench adds what its references ran on.
 */
// Benches measure the roles as they run: with the environment every role process gets (glibc reads
// its allocator settings at start-up, so this process starts again with them when they are missing).
if (Object.entries(ROLE_ENV).some(([k, v]) => process.env[k] !== v)) {
  const again = spawnSync(process.execPath, [...process.execArgv, ...process.argv.slice(1)], { stdio: "inherit", env: roleEnv() });
  process.exit(again.status ?? 1);
}

const BENCHES = ["transport", "buffer", "trainer", "trainer-gpu", "producer", "pipeline"] as const;
type BenchName = (typeof BENCHES)[number];

const asked = process.argv.slice(2);
const unknown = asked.filter((a) => !(BENCHES as readonly string[]).includes(a));
if (unknown.length) {
  process.stderr.write(`unknown benchmark ${unknown.join(", ")}; choose from ${BENCHES.join(", ")}\n`);
  process.exit(2);
}
const names: BenchName[] = asked.length ? (asked as BenchName[]) : [...BENCHES];
const figures: Record<string, number | string> = {
  cores: availableParallelism(),
  node: process.versions.node,
  cpu: cpus()[0]?.model ?? "unknown",
};
for (const name of names) {
  process.stdout.write(`\n== ${name} (${figures.cores} cores)\n`);
  const mod = (await import(`./${name}.js`)) as { run: () => Promise<Record<string, number | string>> };
  const result = await mod.run();
  for (const [k, v] of Object.entries(result)) figures[`${name}.${k}`] = v;
}
process.stdout.write(`${JSON.stringify(figures)}\n`);
process.exit(0);
