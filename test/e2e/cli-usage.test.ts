import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { describe, it } from "node:test";

// The saeflow command's usage, as a newcomer asks for it.

const saeflow = (...args: string[]) =>
  spawnSync(process.execPath, ["--import", "tsx", "tools/cli/main.ts", ...args], { encoding: "utf8", timeout: 60_000 });

describe("saeflow usage", () => {
  it("prints the commands on help, --help and -h (exit 0), and with no command (exit 2)", () => {
    for (const args of [["help"], ["--help"], ["-h"], ["status", "--help"]]) {
      const r = saeflow(...args);
      assert.equal(r.status, 0, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stdout, /^usage: saeflow <command>/);
      assert.match(r.stdout, /\n {2}pretokenize CONFIG OUT\.jsonl /);
    }
    const bare = saeflow();
    assert.equal(bare.status, 2);
    assert.match(bare.stdout, /^usage: saeflow <command>/);
  });

  it("names an unknown command and exits 2", () => {
    const r = saeflow("train");
    assert.equal(r.status, 2);
    assert.match(r.stderr, /saeflow: unknown command "train"/);
  });
});
