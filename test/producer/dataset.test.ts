import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { encodeAhead } from "../../services/producer/dataset/ahead.js";
import { shardContexts } from "../../services/producer/dataset/contexts.js";
import { type Context, packContexts, type PackOptions } from "../../services/producer/dataset/pack.js";
import { freshPosition, PositionStore } from "../../services/producer/dataset/position.js";
import { shardDocuments } from "../../services/producer/dataset/shard.js";
import {
  builtinCorpus,
  type Document,
  readDocuments,
  type ReadOptions,
  readOptionsOf,
  resolveSources,
  type SourceFile,
} from "../../services/producer/dataset/sources.js";
import { paragraphs, writeDataset } from "./harness.js";

const read = (split: ReadOptions["textSplit"] = "paragraph"): ReadOptions => ({
  textSplit: split,
  textField: "text",
  log: () => undefined,
});
const START = { fileIndex: 0, offset: 0, documentIndex: 0 };

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

/** A word-level stand-in tokenizer: ids are word lengths + 10, so tests can read the stream back. */
const encode = (text: string): number[] =>
  text
    .split(/\s+/)
    .filter(Boolean)
    .map((w) => w.length + 10);
/** The same for a batch, answered later and out of order, as the native tokenizer's thread pool may. */
const encodeAsync = async (texts: readonly string[]): Promise<number[][]> => {
  await new Promise((r) => setTimeout(r, (texts.join("").length * 7) % 3));
  return texts.map(encode);
};
const BOS = 1;
const PAD = 0;
const pack = (over: Partial<PackOptions> = {}): PackOptions => ({
  contextLength: 8,
  prependBos: true,
  excludeBos: true,
  bosId: BOS,
  padId: PAD,
  ...over,
});

describe("dataset sources", () => {
  let root: string;
  before(() => {
    root = mkdtempSync(join(tmpdir(), "saeflow-dataset-"));
  });
  after(() => rmSync(root, { recursive: true, force: true }));

  it("splits plain text into lines, paragraphs or whole files, with byte offsets to resume from", async () => {
    const dir = writeDataset(root, "split", { "a.txt": "one two\r\nthree\n\n\nfour five\n  \nsix" });
    const files = resolveSources([dir]);
    const texts = async (split: ReadOptions["textSplit"]) => (await collect(readDocuments(files, read(split), START))).map((d) => d.text);
    assert.deepEqual(await texts("line"), ["one two", "three", "four five", "six"]);
    assert.deepEqual(await texts("paragraph"), ["one two\nthree", "four five", "six"]);
    assert.equal((await texts("file")).length, 1);
    const docs = await collect(readDocuments(files, read("paragraph"), START));
    const resumed = await collect(readDocuments(files, read("paragraph"), { fileIndex: 0, offset: docs[1]!.offset, documentIndex: 1 }));
    assert.deepEqual(resumed, docs.slice(1));
  });

  it("reads the text field of JSONL records and skips broken ones without numbering them", async () => {
    const lines = ['{"text":"alpha beta"}', "not json", '{"body":"no text"}', "", '{"text":"gamma"}'];
    const dir = writeDataset(root, "jsonl", { "x.jsonl": lines.join("\n") });
    const logged: string[] = [];
    const docs = await collect(readDocuments(resolveSources([dir]), { ...read(), log: (l) => logged.push(l) }, START));
    assert.deepEqual(
      docs.map((d) => [d.index, d.text]),
      [
        [0, "alpha beta"],
        [1, "gamma"],
      ],
    );
    assert.equal(logged.length, 2);
    assert.match(logged[1]!, /no string field "text" \(producer\.textField\)/);
  });

  it("reads token ids from JSONL records when tokens are asked for, skipping records a tokenizer of that vocabulary cannot have made", async () => {
    const lines = [
      '{"input_ids":[5,0,9]}',
      '{"text":"only text"}',
      '{"input_ids":[3,10]}',
      '{"input_ids":[3,-1]}',
      '{"input_ids":[3,1.5]}',
      '{"input_ids":"3 4"}',
      '{"input_ids":[]}',
      '{"input_ids":[7],"text":"ignored"}',
    ];
    const dir = writeDataset(root, "ids", { "x.jsonl": lines.join("\n"), "y.txt": "plain text stays text" });
    const logged: string[] = [];
    const options = readOptionsOf({ textSplit: "paragraph", textField: "text", tokensField: "input_ids" }, 10, (l) => logged.push(l));
    const docs = await collect(readDocuments(resolveSources([dir]), options, START));
    assert.deepEqual(
      docs.map((d) => [d.index, d.ids ?? d.text]),
      [
        [0, [5, 0, 9]],
        [1, []],
        [2, [7]],
        [3, "plain text stays text"],
      ],
    );
    assert.equal(logged.length, 5);
    assert.match(logged[0]!, /at byte 22: no array field "input_ids" \(producer\.tokensField\); record skipped/);
    // Whole ids past the vocabulary point at the tokenizer; anything else at the field.
    assert.match(
      logged[1]!,
      /"input_ids" holds 10 at position 1, past the vocabulary of 10 ids \(made by another tokenizer than producer\.tokenizer\?\)/,
    );
    assert.match(logged[2]!, /"input_ids" holds -1 at position 1, not a token id \(producer\.tokensField\)/);
    assert.match(logged[3]!, /holds 1\.5 at position 1, not a token id/);
    assert.match(logged[4]!, /no array field "input_ids"/);

    // Read from a CLI (the evaluation's), skips name its flags instead.
    const flagged: string[] = [];
    const keys = { tokensField: "--tokens-field", tokenizer: "--tokenizer" };
    const fromCli = readOptionsOf(
      { textSplit: "paragraph", textField: "text", tokensField: "input_ids" },
      10,
      (l) => flagged.push(l),
      keys,
    );
    await collect(readDocuments(resolveSources([dir]), fromCli, START));
    assert.match(flagged[0]!, /no array field "input_ids" \(--tokens-field\)/);
    assert.match(flagged[1]!, /made by another tokenizer than --tokenizer\?/);
    assert.match(flagged[2]!, /not a token id \(--tokens-field\)/);
  });

  it("tokenizes ahead only the documents that come without ids, keeping the documents' order", async () => {
    const encoded: string[] = [];
    const counting = async (texts: readonly string[]) => (encoded.push(...texts), encodeAsync(texts));
    async function* mixed(): AsyncGenerator<Document> {
      yield { index: 0, fileIndex: 0, offset: 0, ids: [1, 2] };
      yield { index: 1, fileIndex: 1, offset: 0, text: "aa bbb" };
      yield { index: 2, fileIndex: 2, offset: 0, ids: [] };
      yield { index: 3, fileIndex: 2, offset: 9, ids: [4] };
      yield { index: 4, fileIndex: 3, offset: 0, text: "c" };
    }
    const out = await collect(encodeAhead(mixed(), counting, { documents: 2, chars: 1 << 20, batchChars: 4 }));
    assert.deepEqual(
      out.map((e) => [e.doc.index, e.ids]),
      [
        [0, [1, 2]],
        [1, [12, 13]],
        [2, []],
        [3, [4]],
        [4, [11]],
      ],
    );
    assert.deepEqual(encoded, ["aa bbb", "c"]);
  });

  it("walks folders recursively in a sorted order and numbers documents across files", async () => {
    const dir = writeDataset(root, "tree", {
      "b/z.md": "z1\n\nz2",
      "a.txt": "a1",
      "b/y.jsonl": '{"text":"y1"}',
      "skip.bin": "x",
      ".hidden.txt": "h",
    });
    const files = resolveSources([dir]);
    assert.deepEqual(
      files.map((f) => [f.path.slice(dir.length + 1), f.format]),
      [
        ["a.txt", "text"],
        ["b/y.jsonl", "jsonl"],
        ["b/z.md", "text"],
      ],
    );
    const docs = await collect(readDocuments(files, read(), START));
    assert.deepEqual(
      docs.map((d) => `${d.index}:${d.fileIndex}:${d.text}`),
      ["0:0:a1", "1:1:y1", "2:2:z1", "3:2:z2"],
    );
  });

  it("names the dataset entry that does not exist", () => {
    assert.throws(
      () => resolveSources(["builtin:corpus", join(root, "nope.txt")]),
      (err: ConfigError) => err instanceof ConfigError && err.keys[0] === "producer.dataset.1" && err.message.includes("nope.txt"),
    );
  });

  it("builtin:corpus is the sorted .md files of the installed dependencies", () => {
    const corpus = builtinCorpus();
    assert.ok(corpus.length >= 10, `${corpus.length} files`);
    assert.ok(corpus.every((f) => f.toLowerCase().endsWith(".md") && !f.split("node_modules/")[1]!.includes("/node_modules/")));
    assert.deepEqual(
      [...corpus].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)),
      corpus,
    );
    assert.ok(corpus.some((f) => f.endsWith("node_modules/onnxruntime-node/README.md")));
  });
});

describe("sharding", () => {
  it("N shards cover every document exactly once", async () => {
    const root = mkdtempSync(join(tmpdir(), "saeflow-shard-"));
    try {
      const dir = writeDataset(root, "d", {
        "a.txt": paragraphs(17),
        "b.txt": paragraphs(12, 1),
        "c.jsonl": '{"text":"x"}\n{"text":"y"}\n',
      });
      const files = resolveSources([dir]);
      const all = await collect(readDocuments(files, read(), START));
      for (const count of [1, 2, 3, 5]) {
        const seen = new Map<number, number>();
        for (let index = 0; index < count; index++) {
          for (const doc of await collect(shardDocuments(readDocuments(files, read(), START), { index, count })))
            seen.set(doc.index, (seen.get(doc.index) ?? 0) + 1);
        }
        assert.deepEqual(
          [...seen.keys()].sort((a, b) => a - b),
          all.map((d) => d.index),
          `count ${count}`,
        );
        assert.ok([...seen.values()].every((n) => n === 1));
      }
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});

async function* docsOf(texts: string[]): AsyncGenerator<Document> {
  let offset = 0;
  for (const [index, text] of texts.entries()) {
    yield { index, fileIndex: 0, offset, text };
    offset += text.length + 1;
  }
}

describe("packing", () => {
  const texts = ["a bb ccc", "dddd", "", "e ff ggg hhhh iiiii jjjjjj kkkkkkk llllllll mmmmmmmmm", "n oo"];
  const state = { cursor: freshPosition().cursor, contexts: 0, documentsDone: 0 };

  it("starts contexts with BOS, separates documents with BOS, pads the last and marks what is sent", async () => {
    const ctxs = await collect(packContexts(encodeAhead(docsOf(texts), encodeAsync), pack(), state));
    assert.ok(ctxs.every((c) => c.tokens.length === 8));
    assert.deepEqual(ctxs[0]!.tokens, [BOS, 11, 12, 13, BOS, 14, BOS, 11]);
    assert.deepEqual([...ctxs[0]!.keep], [0, 1, 1, 1, 0, 1, 0, 1]);
    assert.deepEqual([...ctxs[0]!.documentIds], [0, 0, 0, 0, 1, 1, 3, 3]);
    const last = ctxs[ctxs.length - 1]!;
    assert.ok(last.length < 8);
    assert.deepEqual(last.tokens.slice(last.length), Array(8 - last.length).fill(PAD));
    assert.ok([...last.keep.slice(last.length)].every((k) => k === 0));
    const sent = ctxs.flatMap((c) => c.tokens.filter((_, p) => c.keep[p]));
    assert.deepEqual(sent, texts.flatMap(encode), "every token once, in order");
    assert.equal(last.documentsDone, texts.length);
    assert.deepEqual(
      ctxs.map((c) => c.id),
      ctxs.map((_, i) => i),
    );
  });

  it("keeps BOS rows when asked and packs without a leading BOS", async () => {
    const kept = await collect(packContexts(encodeAhead(docsOf(texts), encodeAsync), pack({ excludeBos: false }), state));
    assert.deepEqual([...kept[0]!.keep], [1, 1, 1, 1, 1, 1, 1, 1]);
    const bare = await collect(packContexts(encodeAhead(docsOf(texts), encodeAsync), pack({ prependBos: false }), state));
    assert.deepEqual(bare[0]!.tokens, [11, 12, 13, BOS, 14, BOS, 11, 12]);
  });

  it("resuming from any context's end cursor yields exactly the contexts that followed it", async () => {
    for (const options of [pack(), pack({ prependBos: false }), pack({ contextLength: 3 })]) {
      const whole = await collect(packContexts(encodeAhead(docsOf(texts), encodeAsync), options, state));
      for (const [i, ctx] of whole.entries()) {
        const from = ctx.end;
        if (from.epoch !== 0) continue; // the padded last context points at the next epoch (tested below)
        const rest = docsOf(texts.slice(from.documentIndex));
        const shifted = async function* () {
          for await (const d of rest) yield { ...d, index: d.index + from.documentIndex };
        };
        const resumed = await collect(
          packContexts(encodeAhead(shifted(), encodeAsync), options, {
            cursor: from,
            contexts: ctx.id + 1,
            documentsDone: ctx.documentsDone,
          }),
        );
        const strip = (cs: Context[]) => cs.map((c) => ({ ...c, end: { ...c.end, offset: 0 } }));
        assert.deepEqual(
          strip(resumed),
          strip(whole.slice(i + 1)),
          `after context ${i} (L=${options.contextLength}, bos=${options.prependBos})`,
        );
      }
    }
  });
});

describe("position and epochs", () => {
  it("a producer's contexts across epochs resume from a saved position; the file refuses another dataset", async () => {
    const root = mkdtempSync(join(tmpdir(), "saeflow-position-"));
    try {
      const dir = writeDataset(root, "d", { "a.txt": paragraphs(5), "b.txt": paragraphs(4, 1) });
      const files: SourceFile[] = resolveSources([dir]);
      const source = { files, read: read(), shard: { index: 1, count: 2 }, pack: pack(), encode: encodeAsync, epochs: 2 };
      const whole = await collect(shardContexts(source, freshPosition()));
      assert.equal(new Set(whole.map((c) => c.end.epoch)).size, 3, "two epochs, the last context points at epoch 2");
      const store = new PositionStore(join(root, "state", "p.json"), "fp-1");
      const cut = whole[Math.floor(whole.length / 3)]!;
      store.save({ cursor: cut.end, documentsDone: cut.documentsDone, contexts: cut.id + 1, exhausted: false, nextSequence: { h: 3 } });
      const loaded = store.load()!;
      assert.deepEqual(loaded.nextSequence, { h: 3 });
      const resumed = await collect(shardContexts(source, loaded));
      assert.deepEqual(resumed, whole.slice(cut.id + 1));
      assert.throws(
        () => new PositionStore(store.path, "fp-2").load(),
        (err: ConfigError) => err.keys[0] === "producer.stateFile",
      );
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
