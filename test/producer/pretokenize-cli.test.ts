import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import { paragraphs, writeDataset } from "./harness.js";

// `saeflow pretokenize` as a user runs it: the real CLI in its own process, the Llama-3.1 tokenizer.

const root = mkdtempSync(join(tmpdir(), "saeflow-pretokenize-"));
after(() => rmSync(root, { recursive: true, force: true }));

const cli = (...args: string[]) =>
  spawnSync(process.execPath, ["--import", "tsx", "tools/cli/main.ts", "pretokenize", ...args], { encoding: "utf8", timeout: 120_000 });

describe("saeflow pretokenize", () => {
  it("writes one record of token ids per document, the ids the tokenizer gives the text, and says how to train on them", async () => {
    const text = paragraphs(5, 1);
    const dir = writeDataset(root, "data", { "a.txt": text });
    const out = join(root, "ids.jsonl");
    const r = cli("deploy/configs/local.yaml", out, "--set", `producer.dataset=[${dir}]`);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /wrote 5 documents, \d+ tokens to /);
    assert.match(r.stderr, /--set producer\.tokensField=input_ids/);
    const records = readFileSync(out, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { input_ids: number[] });
    const want = await loadTokenizer("builtin:llama3_1").encode(text.split("\n\n").map((t) => t.trim()));
    assert.deepEqual(
      records.map((r) => r.input_ids),
      want,
    );
    assert.equal(existsSync(`${out}.partial`), false);
    const meta = JSON.parse(readFileSync(`${out}.meta.json`, "utf8")) as Record<string, unknown>;
    assert.deepEqual(meta, {
      field: "input_ids",
      tokenizer: { source: "builtin:llama3_1", fingerprint: loadTokenizer("builtin:llama3_1").fingerprint, vocabSize: 128256 },
      documents: 5,
      tokens: want.flat().length,
    });
  });

  it("refuses a command line it cannot carry out, naming what is wrong, and writes nothing", () => {
    const own = join(writeDataset(root, "own", { "ids.jsonl": '{"input_ids":[1]}' }), "ids.jsonl");
    const cases: Array<[string[], RegExp]> = [
      [["deploy/configs/local.yaml"], /pretokenize needs a CONFIG file and an OUT file/],
      [["deploy/configs/local.yaml", join(root, "ids.txt")], /OUT .*ids\.txt must end in \.jsonl/],
      [
        ["deploy/configs/local.yaml", join(root, "x.jsonl"), "--set", `producer.dataset=[${join(root, "missing")}]`],
        /producer\.dataset\.0: .*missing does not exist/,
      ],
      [["deploy/configs/local.yaml", join(root, "y.jsonl"), "--set", "producer.tokenizer=/no/tokenizer.json"], /producer\.tokenizer: /],
      [
        ["deploy/configs/local.yaml", own, "--set", `producer.dataset=[${join(root, "own")}]`],
        /is the output of pretokenize and part of the dataset/,
      ],
      [
        ["deploy/configs/local.yaml", join(root, "no-such-folder", "z.jsonl")],
        /OUT .*z\.jsonl is in .*no-such-folder, which is not a folder/,
      ],
    ];
    for (const [args, message] of cases) {
      const r = cli(...args);
      assert.equal(r.status, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, message);
    }
    assert.deepEqual(
      ["ids.txt", "x.jsonl", "y.jsonl", "x.jsonl.partial", "y.jsonl.partial", "own/ids.jsonl.partial"].filter((f) =>
        existsSync(join(root, f)),
      ),
      [],
    );
    assert.equal(readFileSync(own, "utf8"), '{"input_ids":[1]}');
  });

  it("fails with a message naming OUT, not a crash, when it cannot write there", () => {
    // A folder where the file being written goes: opening it fails as a full or read-only disk would.
    mkdirSync(join(root, "w.jsonl.partial"));
    const r = cli("deploy/configs/local.yaml", join(root, "w.jsonl"));
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /^saeflow: pretokenize cannot write .*w\.jsonl: EISDIR/m);
    assert.doesNotMatch(r.stderr, /Unhandled|at .*\.ts:\d+/);
    assert.equal(existsSync(join(root, "w.jsonl")), false);
  });
});
