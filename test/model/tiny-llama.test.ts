import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import * as ort from "onnxruntime-node";
import { HOOK_KINDS } from "../../services/producer/model/hooks.js";
import { loadModel } from "../../services/producer/model/onnx.js";
import { openHookSession } from "../../services/producer/model/session.js";
import { maxDiff } from "../../tools/model/check.js";
import { makeWeights, type LlamaWeights } from "../../tools/model/llama.js";
import { referenceForward } from "../../tools/model/reference.js";
import { makeTinyLlama } from "../../tools/model/tiny-llama.js";
import { feedsFor, maxAbs, rowOf, tempTinyLlama } from "./tiny.js";

const root = join(import.meta.dirname, "../..");
const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");

// "<|begin_of_text|>The quick brown fox jumps over the" in the Llama-3.1 vocabulary, and a
// second row left-padded by three, positions counting from its first real token as transformers does.
const TOKENS = [128000, 791, 4062, 14198, 39935, 35308, 927, 279];
const PADDED = [0, 0, 0, 128000, 40, 1093, 8415, 13];
const PADDED_MASK = [0, 0, 0, 1, 1, 1, 1, 1];
const PADDED_POSITIONS = [1, 1, 1, 0, 1, 2, 3, 4];

describe("tiny llama", () => {
  const tiny = tempTinyLlama();
  let weights: LlamaWeights;
  let session: ort.InferenceSession;
  before(async () => {
    weights = makeWeights(tiny.params);
    session = await ort.InferenceSession.create(tiny.modelPath);
  });
  after(async () => {
    await session.release();
    tiny.remove();
  });

  it("has the inputs, outputs and node names of an optimum Llama export", () => {
    assert.deepEqual(session.inputNames, ["input_ids", "attention_mask", "position_ids"]);
    assert.deepEqual(session.outputNames, ["logits"]);
    const names = new Set(loadModel(tiny.modelPath).graph!.node!.map((n) => n.name));
    for (const name of [
      "/model/embed_tokens/Gather",
      "/model/layers.0/self_attn/q_proj/MatMul",
      "/model/layers.1/self_attn/o_proj/MatMul",
      "/model/layers.0/Add",
      "/model/layers.0/Add_1",
      "/model/layers.1/mlp/down_proj/MatMul",
      "/model/norm/Mul_1",
      "/lm_head/MatMul",
    ]) {
      assert.ok(names.has(name), `missing node ${name}`);
    }
  });

  it("computes the same logits as the TypeScript Llama reference, padding included", async () => {
    const out = await session.run(
      feedsFor([TOKENS, PADDED], [TOKENS.map(() => 1), PADDED_MASK], [TOKENS.map((_, i) => i), PADDED_POSITIONS]),
    );
    const rows = [
      referenceForward(tiny.params, weights, { ids: TOKENS }),
      referenceForward(tiny.params, weights, { ids: PADDED, mask: PADDED_MASK, positions: PADDED_POSITIONS }),
    ];
    rows.forEach((want, row) => {
      const got = rowOf(out.logits!, row);
      assert.ok(
        maxDiff(got, want.logits) <= 1e-5 * maxAbs(want.logits),
        `row ${row}: max diff ${maxDiff(got, want.logits)} vs logits up to ${maxAbs(want.logits)}`,
      );
    });
  });

  it("gives real tokens the same logits whether or not the row is left-padded", async () => {
    const real = PADDED.slice(3);
    const alone = await session.run(feedsFor([real]));
    const padded = await session.run(feedsFor([PADDED], [PADDED_MASK], [PADDED_POSITIONS]));
    const vocab = tiny.params.vocabSize;
    const got = rowOf(padded.logits!, 0).subarray(3 * vocab);
    assert.ok(maxDiff(got, rowOf(alone.logits!, 0)) < 1e-5);
  });

  it("matches the reference at every hook point, so each name means what interpretability tools mean by it", async () => {
    const hooks = [0, 1].flatMap((l) => HOOK_KINDS.map((k) => `blocks.${l}.${k}`));
    const hooked = await openHookSession(tiny.modelPath, hooks);
    try {
      const out = await hooked.run(feedsFor([TOKENS]));
      const want = referenceForward(tiny.params, weights, { ids: TOKENS }).hooks;
      for (const hook of hooks) {
        const got = rowOf(out[hook]!, 0);
        const expected = want.get(hook)!;
        assert.deepEqual(out[hook]!.dims, [1, TOKENS.length, tiny.params.dModel]);
        assert.ok(maxDiff(got, expected) <= 1e-5 * maxAbs(expected), `${hook}: max diff ${maxDiff(got, expected)}`);
      }
    } finally {
      await hooked.release();
    }
  });

  it("is laid out like a Hugging Face export folder", () => {
    const config = JSON.parse(readFileSync(join(tiny.dir, "config.json"), "utf8")) as Record<string, unknown>;
    assert.equal(config.model_type, "llama");
    assert.equal(config.hidden_size, 64);
    assert.equal(config.num_hidden_layers, 2);
    assert.equal(config.num_key_value_heads, 2);
    assert.equal(config.vocab_size, 128256);
    const tokenizer = JSON.parse(readFileSync(join(tiny.dir, "tokenizer.json"), "utf8")) as { added_tokens: Array<{ id: number }> };
    assert.equal(Math.max(...tokenizer.added_tokens.map((t) => t.id)) + 1, config.vocab_size);
    assert.ok(existsSync(join(tiny.dir, "tokenizer_config.json")));
  });

  it("is the same model for the same seed, another for another seed, and is not rewritten when present", () => {
    const same = tempTinyLlama();
    const other = tempTinyLlama({ seed: 1 });
    try {
      assert.equal(sha(same.modelPath), sha(tiny.modelPath));
      assert.notEqual(sha(other.modelPath), sha(tiny.modelPath));
      const again = makeTinyLlama({ out: tiny.dir });
      assert.equal(again.generated, false);
    } finally {
      same.remove();
      other.remove();
    }
  });

  it("CLI reports an existing model instead of regenerating it", () => {
    const out = execFileSync("npx", ["tsx", "tools/model/tiny-llama.ts", "--out", tiny.dir, "--seed", "0"], {
      cwd: root,
      encoding: "utf8",
    });
    assert.match(out, /already at .*model\.onnx/);
  });
});
