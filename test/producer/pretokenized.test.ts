import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { checkPretokenized } from "../../services/producer/dataset/pretokenized.js";
import { resolveSources } from "../../services/producer/dataset/sources.js";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import { writeDataset } from "./harness.js";

// A run refuses, at start and naming the setting, a pretokenized file it would misread.

const root = mkdtempSync(join(tmpdir(), "saeflow-pretokenized-"));
after(() => rmSync(root, { recursive: true, force: true }));
const tokenizer = loadTokenizer("builtin:llama3_1");
const meta = (fingerprint: string, field = "input_ids") =>
  JSON.stringify({ field, tokenizer: { source: "some/tokenizer", fingerprint, vocabSize: 10 }, documents: 1, tokens: 2 });
const refusal = (key: string, message: RegExp) => (err: ConfigError) => {
  assert.ok(err instanceof ConfigError, String(err));
  assert.deepEqual(err.keys, [key]);
  assert.match(err.message, message);
  return true;
};

describe("pretokenized files", () => {
  it("passes files whose record names this tokenizer and the field read, and files with no record", () => {
    const dir = writeDataset(root, "fine", {
      "a.jsonl": '{"input_ids":[1,2]}',
      "a.jsonl.meta.json": meta(tokenizer.fingerprint),
      "b.jsonl": '{"input_ids":[3]}',
      "c.txt": "text is text",
    });
    assert.match(tokenizer.fingerprint, /^[0-9a-f]{16}$/);
    checkPretokenized(resolveSources([dir]), "input_ids", tokenizer);
  });

  it("refuses ids made by another tokenizer, naming both", () => {
    const dir = writeDataset(root, "other", { "a.jsonl": '{"input_ids":[1,2]}', "a.jsonl.meta.json": meta("0123456789abcdef") });
    assert.throws(
      () => checkPretokenized(resolveSources([dir]), "input_ids", tokenizer),
      refusal(
        "producer.tokenizer",
        /a\.jsonl was pretokenized with some\/tokenizer \(tokenizer\.json sha256 0123456789abcdef\), not with builtin:llama3_1/,
      ),
    );
  });

  it("refuses to read a pretokenized file as text or from another field, saying which field to set", () => {
    const dir = writeDataset(root, "field", { "a.jsonl": '{"ids":[1,2]}', "a.jsonl.meta.json": meta(tokenizer.fingerprint, "ids") });
    const files = resolveSources([dir]);
    assert.throws(
      () => checkPretokenized(files, "", tokenizer),
      refusal("producer.tokensField", /in "ids"; set producer\.tokensField=ids to read them/),
    );
    assert.throws(
      () => checkPretokenized(files, "input_ids", tokenizer),
      refusal("producer.tokensField", /in "ids"; set producer\.tokensField=ids$/),
    );
    const flags = { dataset: "--dataset", tokenizer: "--tokenizer", tokensField: "--tokens-field" };
    assert.throws(() => checkPretokenized(files, "", tokenizer, flags), refusal("--tokens-field", /set --tokens-field=ids to read them/));
  });

  it("refuses a record it cannot read", () => {
    for (const [name, record] of [
      ["broken", "{"],
      ["empty", "{}"],
      ["null", "null"],
    ] as const) {
      const dir = writeDataset(root, name, { "a.jsonl": '{"input_ids":[1]}', "a.jsonl.meta.json": record });
      assert.throws(
        () => checkPretokenized(resolveSources([dir]), "input_ids", tokenizer),
        refusal("producer.dataset", /a\.jsonl\.meta\.json is not a record saeflow pretokenize wrote/),
        name,
      );
    }
  });
});
