import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

/**
 * The house's layering, read from the sources (eslint's no-restricted-imports says the same while
 * editing): tools -> roles -> common -> gen. A role never imports another role, common imports no
 * role, gen imports only gen, and nothing under services/ reaches into tools/ or test/.
 */

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const SERVICES = join(ROOT, "services");
const ROLES = ["buffer", "producer", "trainer"];
const SPECIFIER =
  /(?:^|\s)(?:import|export)\s[^"';]*?from\s+["']([^"']+)["']|import\s*\(\s*["']([^"']+)["']\s*\)|^import\s+["']([^"']+)["']/gm;

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith(".ts") ? [join(dir, e.name)] : [],
  );
}

/** The first folder under services/ a path lies in ("buffer", "common", "gen", ...), or "outside". */
function area(path: string): string {
  const rel = relative(SERVICES, path);
  return rel.startsWith("..") ? "outside" : rel.split(sep)[0]!;
}

function allowed(from: string, to: string): boolean {
  if (to === "outside") return false;
  if (from === "gen") return to === "gen";
  if (from === "common") return to === "common" || to === "gen";
  return to === from || to === "common" || to === "gen";
}

test("a role never imports another role; common imports no role; gen imports only gen; services/ never reaches outside", () => {
  const files = sources(SERVICES);
  const bad: string[] = [];
  const seen = new Set<string>();
  for (const file of files) {
    const from = area(file);
    for (const m of readFileSync(file, "utf8").matchAll(SPECIFIER)) {
      const spec = (m[1] ?? m[2] ?? m[3])!;
      if (!spec.startsWith(".")) continue;
      const to = area(resolve(dirname(file), spec));
      seen.add(`${from}->${to}`);
      if (!allowed(from, to)) bad.push(`${relative(ROOT, file)}: ${spec} (${from} -> ${to})`);
    }
  }
  assert.deepEqual(bad, []);
  // The scan saw the layering it guards: every role uses common and gen, common uses gen.
  for (const role of ROLES)
    for (const to of ["common", "gen"]) assert.ok(seen.has(`${role}->${to}`), `no ${role} -> ${to} import was seen`);
  assert.ok(seen.has("common->gen"));
});
