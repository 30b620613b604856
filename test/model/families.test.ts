import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import * as ort from "onnxruntime-node";
import { modelLayout, resolveHooks } from "../../services/producer/model/hooks.js";
import { loadModel } from "../../services/producer/model/onnx.js";
import { openHookSession } from "../../services/producer/model/session.js";
import { suffixFromHook, truncateAtHooks } from "../../services/producer/model/truncate.js";
import { checkSuffix, checkTruncation, maxDiff } from "../../tools/model/check.js";
import { referenceDecoder } from "../../tools/model/decoder-reference.js";
import type { DecoderWeights } from "../../tools/model/decoder-weights.js";
import { type DecoderParams, FAMILIES, FAMILY_NAMES, type FamilyName } from "../../tools/model/families.js";
import { allHooks, feedsFor, maxAbs, rowOf, tempTinyFamily } from "./tiny.js";

// Each supported family's tiny model against its float64 TypeScript reference, and the hook
// mapping, truncation and suffix splicing on it. Tolerance: 1e-5 of the largest reference value
// of each tensor (float32 graph against float64 sums); truncation and splicing are exact (0).

interface Expected {
  layout: string;
  /** Node names an optimum (torch.onnx) export of the family has. */
  nodes: string[];
  /** Layer 0's hook tensors: which tensor each hook name denotes in this family. */
  tensors: Record<string, string>;
}

const EXPECTED: Record<FamilyName, Expected> = {
  gpt2: {
    layout: "GPT-2",
    nodes: [
      "/transformer/wte/Gather",
      "/transformer/wpe/Gather",
      "/transformer/h.0/attn/c_attn/Gemm",
      "/transformer/h.0/attn/Split",
      "/transformer/h.1/mlp/act/Tanh",
      "/transformer/ln_f/ReduceMean",
      "/lm_head/MatMul",
    ],
    tensors: {
      "blocks.0.hook_resid_pre": "/transformer/Add_output_0",
      "blocks.0.hook_attn_out": "/transformer/h.0/attn/c_proj/Reshape_1_output_0",
      "blocks.0.hook_resid_mid": "/transformer/h.0/Add_output_0",
      "blocks.0.hook_mlp_out": "/transformer/h.0/mlp/c_proj/Reshape_1_output_0",
      "blocks.0.hook_resid_post": "/transformer/h.0/Add_1_output_0",
    },
  },
  gpt_neox: {
    layout: "GPT-NeoX (Pythia)",
    nodes: [
      "/gpt_neox/embed_in/Gather",
      "/gpt_neox/layers.0/input_layernorm/LayerNormalization",
      "/gpt_neox/layers.0/attention/query_key_value/MatMul",
      "/gpt_neox/layers.1/mlp/act/Erf",
      "/gpt_neox/final_layer_norm/LayerNormalization",
      "/embed_out/MatMul",
    ],
    tensors: {
      "blocks.0.hook_resid_pre": "/gpt_neox/embed_in/Gather_output_0",
      "blocks.0.hook_attn_out": "/gpt_neox/layers.0/attention/dense/Add_output_0",
      "blocks.0.hook_mlp_out": "/gpt_neox/layers.0/mlp/dense_4h_to_h/Add_output_0",
      "blocks.0.hook_resid_post": "/gpt_neox/layers.0/Add_1_output_0",
    },
  },
  gemma2: {
    layout: "Gemma 2",
    nodes: [
      "/model/embed_tokens/Gather",
      "/model/Mul",
      "/model/layers.0/self_attn/Tanh",
      "/model/layers.0/pre_feedforward_layernorm/Cast",
      "/model/layers.1/post_feedforward_layernorm/Mul_1",
      "/lm_head/MatMul",
      "/Tanh",
    ],
    tensors: {
      "blocks.0.hook_resid_pre": "/model/Mul_output_0",
      "blocks.0.hook_attn_out": "/model/layers.0/post_attention_layernorm/Cast_1_output_0",
      "blocks.0.hook_resid_mid": "/model/layers.0/Add_output_0",
      "blocks.0.hook_mlp_out": "/model/layers.0/post_feedforward_layernorm/Cast_1_output_0",
      "blocks.0.hook_resid_post": "/model/layers.0/Add_1_output_0",
    },
  },
  qwen2: {
    layout: "Llama, Qwen2, Mistral",
    nodes: [
      "/model/embed_tokens/Gather",
      "/model/layers.0/self_attn/q_proj/Add",
      "/model/layers.0/self_attn/k_proj/Add",
      "/model/layers.1/self_attn/o_proj/MatMul",
      "/model/layers.1/mlp/act_fn/Sigmoid",
      "/model/norm/Mul_1",
      "/lm_head/MatMul",
    ],
    tensors: {
      "blocks.0.hook_resid_pre": "/model/embed_tokens/Gather_output_0",
      "blocks.0.hook_attn_out": "/model/layers.0/self_attn/o_proj/MatMul_output_0",
      "blocks.0.hook_resid_mid": "/model/layers.0/Add_output_0",
      "blocks.0.hook_mlp_out": "/model/layers.0/mlp/down_proj/MatMul_output_0",
      "blocks.0.hook_resid_post": "/model/layers.0/Add_1_output_0",
    },
  },
  mistral: {
    layout: "Llama, Qwen2, Mistral",
    nodes: [
      "/model/embed_tokens/Gather",
      "/model/layers.0/self_attn/q_proj/MatMul",
      "/model/layers.1/mlp/down_proj/MatMul",
      "/model/norm/Mul_1",
      "/lm_head/MatMul",
    ],
    tensors: {
      "blocks.0.hook_resid_pre": "/model/embed_tokens/Gather_output_0",
      "blocks.0.hook_attn_out": "/model/layers.0/self_attn/o_proj/MatMul_output_0",
      "blocks.0.hook_resid_mid": "/model/layers.0/Add_output_0",
      "blocks.0.hook_mlp_out": "/model/layers.0/mlp/down_proj/MatMul_output_0",
      "blocks.0.hook_resid_post": "/model/layers.0/Add_1_output_0",
    },
  },
};

/** Twelve ids from the vocabulary, and a second row left-padded by three. */
function inputs(vocab: number) {
  const tokens = Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % vocab);
  const padded = [0, 0, 0, ...tokens.slice(3).reverse()];
  const mask = padded.map((_, i) => (i < 3 ? 0 : 1));
  const positions = padded.map((_, i) => Math.max(0, i - 3));
  return { tokens, padded, mask, positions };
}

const close = (got: Float32Array, want: Float32Array, what: string) =>
  assert.ok(maxDiff(got, want) <= 1e-5 * maxAbs(want), `${what}: max diff ${maxDiff(got, want)} vs values up to ${maxAbs(want)}`);

for (const family of FAMILY_NAMES) {
  const spec = FAMILIES[family];
  describe(`tiny ${spec.title}`, () => {
    const tiny = tempTinyFamily(family);
    const expected = EXPECTED[family];
    const original = loadModel(tiny.modelPath);
    const hooks = allHooks(family, tiny.params.layers);
    const { tokens, padded, mask, positions } = inputs(tiny.params.vocabSize);
    let weights: DecoderWeights;
    let session: ort.InferenceSession;
    before(async () => {
      weights = tiny.weights();
      session = await ort.InferenceSession.create(tiny.modelPath);
    });
    after(async () => {
      await session.release();
      tiny.remove();
    });
    const reference = (p: DecoderParams, row: "plain" | "padded") =>
      referenceDecoder(p, weights, row === "plain" ? { ids: tokens } : { ids: padded, mask, positions });

    it("is laid out, configured and named like its optimum export", () => {
      assert.deepEqual(session.inputNames, ["input_ids", "attention_mask", "position_ids"]);
      assert.deepEqual(session.outputNames, ["logits"]);
      const config = JSON.parse(readFileSync(join(tiny.dir, "config.json"), "utf8")) as Record<string, unknown>;
      assert.equal(config.model_type, family);
      assert.deepEqual(config.architectures, [spec.architecture]);
      assert.equal(config.vocab_size, tiny.params.vocabSize);
      for (const file of ["tokenizer.json", "tokenizer_config.json"]) assert.ok(existsSync(join(tiny.dir, file)), file);
      const names = new Set(original.graph!.node!.map((n) => n.name));
      for (const name of expected.nodes) assert.ok(names.has(name), `missing node ${name}`);
      assert.equal(modelLayout(original.graph!).families, expected.layout);
    });

    it("computes the reference's logits, a left-padded row included", async () => {
      const out = await session.run(feedsFor([tokens, padded], [tokens.map(() => 1), mask], [tokens.map((_, i) => i), positions]));
      close(rowOf(out.logits!, 0), reference(tiny.params, "plain").logits, "row 0");
      close(rowOf(out.logits!, 1), reference(tiny.params, "padded").logits, "row 1");
    });

    it("maps each hook name to the tensor layouts.ts names and matches the reference there", async () => {
      const layer0 = Object.fromEntries(resolveHooks(original.graph!, Object.keys(expected.tensors)).map((h) => [h.name, h.tensor]));
      assert.deepEqual(layer0, expected.tensors);
      const hooked = await openHookSession(tiny.modelPath, hooks);
      try {
        const out = await hooked.run(feedsFor([tokens]));
        const want = reference(tiny.params, "plain").hooks;
        for (const hook of hooks) {
          assert.deepEqual(out[hook]!.dims, [1, tokens.length, tiny.params.dModel]);
          close(rowOf(out[hook]!, 0), want.get(hook)!, hook);
        }
      } finally {
        await hooked.release();
      }
    });

    it("truncated at every hook point, returns the full model's tensors exactly and drops what follows", async () => {
      assert.deepEqual(
        await checkTruncation(tiny.modelPath, truncateAtHooks(original, hooks), hooks),
        Object.fromEntries(hooks.map((h) => [h, 0])),
      );
      const layer1 = spec.paths.layer.replace("{L}", "1");
      const cut = truncateAtHooks(original, ["blocks.0.hook_resid_post"]);
      assert.ok(!cut.graph!.node!.some((n) => n.name!.startsWith(`/${layer1}/`) || n.name!.startsWith(`/${spec.paths.head}/`)));
    });

    it("prefix → suffix reproduces the original logits exactly", async () => {
      // What the stream after each cut is made of: a sublayer output is added to the residual
      // stream, so that stream is cut too (in a parallel layer, attention and MLP are added together).
      const cuts: Array<[string, string[]]> = [
        ["blocks.0.hook_resid_pre", []],
        ["blocks.0.hook_resid_post", []],
        ["blocks.1.hook_resid_post", []],
        ["blocks.1.hook_attn_out", spec.parallel ? ["blocks.1.hook_resid_pre", "blocks.1.hook_mlp_out"] : ["blocks.1.hook_resid_pre"]],
        ["blocks.0.hook_mlp_out", spec.parallel ? ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"] : ["blocks.0.hook_resid_mid"]],
      ];
      for (const [hook, also] of cuts) {
        const diff = await checkSuffix(tiny.modelPath, truncateAtHooks(original, [hook, ...also]), suffixFromHook(original, hook, also));
        assert.equal(diff, 0, `through ${hook}`);
      }
    });

    if (spec.sliding !== "none") {
      it(`attends through a window of ${tiny.params.slidingWindow} keys (${spec.sliding === "all" ? "every layer" : "even layers"})`, async () => {
        const out = await session.run(feedsFor([tokens]));
        const got = rowOf(out.logits!, 0);
        const unwindowed = reference({ ...tiny.params, slidingWindow: 0 }, "plain").logits;
        const v = tiny.params.vocabSize;
        const w = tiny.params.slidingWindow;
        // Queries that see at most `w` keys are the same either way; later ones are not.
        close(got.subarray(0, w * v), unwindowed.subarray(0, w * v), "positions inside the window");
        assert.ok(maxDiff(got.subarray(w * v), unwindowed.subarray(w * v)) > 1e-3 * maxAbs(unwindowed), "the window changes nothing");
      });
    }

    if (tiny.params.attnSoftcap > 0) {
      it("caps attention scores and final logits with tanh", async () => {
        const got = rowOf((await session.run(feedsFor([tokens]))).logits!, 0);
        for (const off of [{ attnSoftcap: 0 }, { finalSoftcap: 0 }]) {
          const uncapped = reference({ ...tiny.params, ...off }, "plain").logits;
          assert.ok(maxDiff(got, uncapped) > 1e-3 * maxAbs(uncapped), `${Object.keys(off)[0]} changes nothing`);
        }
      });
    }
  });
}
