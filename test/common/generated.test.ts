import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { cpSync, mkdtempSync, readdirSync, readFileSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import { describe, it } from "node:test";

const root = join(import.meta.dirname, "../..");

function listFiles(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? listFiles(p) : [p];
  });
}

describe("generated code", () => {
  it("is what `npm run gen` makes from proto/ now", () => {
    const scratch = mkdtempSync(join(tmpdir(), "saeflow-gen-"));
    cpSync(join(root, "proto"), join(scratch, "proto"), { recursive: true });
    const buf = join(root, "node_modules/.bin/buf");
    const env = { ...process.env, PATH: `${join(root, "node_modules/.bin")}:${process.env.PATH}` };
    const cwd = join(scratch, "proto");
    execFileSync(buf, ["lint"], { cwd, env });
    execFileSync(buf, ["generate"], { cwd, env });
    execFileSync(buf, ["build", "-o", "../services/gen/saeflow.binpb"], { cwd, env });
    const fresh = join(scratch, "services/gen");
    const committed = join(root, "services/gen");
    const names = (dir: string) =>
      listFiles(dir)
        .map((f) => relative(dir, f))
        .sort();
    assert.deepEqual(names(committed), names(fresh), "generated files differ in name; run: npm run gen");
    for (const name of names(fresh)) {
      assert.ok(
        readFileSync(join(committed, name)).equals(readFileSync(join(fresh, name))),
        `services/gen/${name} is stale; run: npm run gen`,
      );
    }
  });
});
