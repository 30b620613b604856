import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { FieldError } from "../../services/common/errors.js";
import { resolveHooks } from "../../services/producer/model/hooks.js";
import { type GraphProto, loadModel } from "../../services/producer/model/onnx.js";
import { truncateAtHooks } from "../../services/producer/model/truncate.js";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import { vocabSize } from "../../tools/model/check.js";
import { FAMILIES, FAMILY_NAMES, type FamilyName } from "../../tools/model/families.js";
import { makeTinyFamily } from "../../tools/model/tiny-family.js";
import { tempTinyFamily } from "./tiny.js";

const root = join(import.meta.dirname, "../..");
const sha = (path: string) => createHash("sha256").update(readFileSync(path)).digest("hex");

/** The graph with node names rewritten, as another exporter (or a fused graph) would name them. */
const renamed = (graph: GraphProto, rename: (name: string, i: number) => string): GraphProto => ({
  ...graph,
  node: graph.node!.map((n, i) => ({ ...n, name: rename(n.name ?? "", i) })),
});

describe("hook mapping across families", () => {
  const tiny = Object.fromEntries(FAMILY_NAMES.map((f) => [f, tempTinyFamily(f)])) as Record<FamilyName, ReturnType<typeof tempTinyFamily>>;
  const graphOf = (f: FamilyName) => loadModel(tiny[f].modelPath).graph!;
  after(() => Object.values(tiny).forEach((t) => t.remove()));

  it("an export without torch.onnx's layer scopes fails naming the scopes it looked for", () => {
    const anonymous = renamed(graphOf("qwen2"), (_, i) => `node_${i}`);
    assert.throws(
      () => resolveHooks(anonymous, ["blocks.0.hook_resid_post"]),
      /no decoder layers .*"\/model\/layers\.<L>\/" \(Llama, Gemma 2, Qwen2, Mistral\), "\/gpt_neox\/layers\.<L>\/" \(GPT-NeoX\) or "\/transformer\/h\.<L>\/" \(GPT-2\)/,
    );
  });

  it("a layer without the sublayer a hook needs fails naming the node pattern, the layer and the layout", () => {
    const graph = renamed(graphOf("gpt2"), (name) => name.replace("/transformer/h.1/attn/c_proj/", "/transformer/h.1/attn/out_proj/"));
    assert.equal(resolveHooks(graph, ["blocks.0.hook_attn_out"])[0]!.tensor, "/transformer/h.0/attn/c_proj/Reshape_1_output_0");
    for (const hook of ["blocks.1.hook_attn_out", "blocks.1.hook_resid_mid"]) {
      assert.throws(
        () => resolveHooks(graph, [hook]),
        new RegExp(
          `hook point "${hook.replaceAll(".", "\\.")}": expected one tensor leaving the nodes named "/transformer/h\\.1/attn/c_proj/\\*" \\(GPT-2 layout\\), found 0: there are no such nodes`,
        ),
      );
    }
  });

  it("a layer 0 of no known layout fails listing the layouts it looked for", () => {
    const graph = renamed(graphOf("mistral"), (name) => name.replace("/self_attn/o_proj/", "/self_attn/out/"));
    assert.throws(
      () => resolveHooks(graph, ["blocks.1.hook_resid_post"]),
      (err: Error) => {
        for (const text of [
          'layer 0 (nodes named "/model/layers.0/*")',
          "self_attn/o_proj/ + mlp/down_proj/ (Llama, Qwen2, Mistral)",
          "self_attn/o_proj/ + post_attention_layernorm/ + post_feedforward_layernorm/ (Gemma 2)",
          "attn/c_proj/ + mlp/c_proj/ (GPT-2)",
          "attention/dense/ + mlp/dense_4h_to_h/ (GPT-NeoX (Pythia))",
          "self_attn/out",
        ]) {
          assert.ok(err.message.includes(text), `"${err.message}" lacks ${text}`);
        }
        return true;
      },
    );
  });

  it("a parallel GPT-NeoX layer has no resid_mid, and asking for one says why, as a hookPoints error", () => {
    assert.throws(
      () => truncateAtHooks(tiny.gpt_neox.modelPath, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]),
      (err: unknown) => {
        assert.ok(err instanceof FieldError);
        assert.equal(err.field, "hookPoints");
        assert.match(
          err.message,
          /"blocks\.1\.hook_resid_mid": this model's attention and MLP run in parallel .*use_parallel_residual.*no resid_mid/,
        );
        return true;
      },
    );
  });

  it("a parallel layer that adds attention to the stream first still has no resid_mid: the MLP does not read that sum", () => {
    // GPT-NeoX sums (mlp + attn) + x; rewired here as (attn + x) + mlp, the same stream in another order.
    const graph = graphOf("gpt_neox");
    const [resid, attn, mlp] = resolveHooks(graph, ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]).map(
      (h) => h.tensor,
    );
    const node = (name: string) => graph.node!.find((n) => n.name === name)!;
    const first = node("/gpt_neox/layers.0/Add");
    const second = node("/gpt_neox/layers.0/Add_1");
    assert.deepEqual(first.input, [mlp, attn]);
    first.input = [attn!, resid!];
    second.input = [first.output![0]!, mlp!];
    const stream = Object.fromEntries(
      resolveHooks(graph, ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"]).map((h) => [h.name, h.tensor]),
    );
    assert.deepEqual(stream, { "blocks.0.hook_resid_pre": resid, "blocks.0.hook_resid_post": second.output![0] });
    assert.throws(
      () => resolveHooks(graph, ["blocks.0.hook_resid_mid"]),
      /"blocks\.0\.hook_resid_mid": this model's attention and MLP run in parallel/,
    );
  });

  it("finds the vocabulary through GPT-2's reshape of input_ids, and the rewrite CLI checks a GPT-2 export", () => {
    assert.equal(vocabSize(loadModel(tiny.gpt2.modelPath)), tiny.gpt2.params.vocabSize);
    const out = execFileSync(
      "npx",
      [
        "tsx",
        "tools/model/rewrite.ts",
        "--model",
        tiny.gpt2.modelPath,
        "--suffix",
        "blocks.1.hook_resid_pre",
        "--out",
        join(tiny.gpt2.dir, "suffix.onnx"),
        "--check",
      ],
      { cwd: root, encoding: "utf8" },
    );
    assert.match(out, /read as a GPT-2 export.*logits through blocks\.1\.hook_resid_pre: max abs diff 0\n.*check passed/s);
  });

  it("each family's tokenizer files load in the producer with the config's vocabulary and BOS", () => {
    for (const family of FAMILY_NAMES) {
      const config = JSON.parse(readFileSync(join(tiny[family].dir, "config.json"), "utf8")) as {
        vocab_size: number;
        bos_token_id: number | null;
      };
      const tokenizer = loadTokenizer(tiny[family].dir);
      assert.equal(tokenizer.vocabSize, config.vocab_size, family);
      assert.equal(tokenizer.bosId ?? null, config.bos_token_id, family);
      assert.equal(tokenizer.bosId === undefined, FAMILIES[family].tokenizer.bos === undefined, family);
    }
  });
});

describe("tiny family generator", () => {
  const tiny = tempTinyFamily("gemma2");
  after(() => tiny.remove());

  it("is the same model for the same seed, another for another seed, and is not rewritten when present", () => {
    const same = tempTinyFamily("gemma2");
    const other = tempTinyFamily("gemma2", { seed: 1 });
    try {
      assert.equal(sha(same.modelPath), sha(tiny.modelPath));
      assert.notEqual(sha(other.modelPath), sha(tiny.modelPath));
      assert.equal(makeTinyFamily({ family: "gemma2", out: tiny.dir }).generated, false);
    } finally {
      same.remove();
      other.remove();
    }
  });

  it("refuses a folder it did not write, and its CLI reports a model already present", () => {
    const foreign = join(tiny.dir, "..", "foreign");
    mkdirSync(foreign);
    writeFileSync(join(foreign, "config.json"), "{}");
    assert.throws(() => makeTinyFamily({ family: "gpt2", out: foreign }), /was not written by tools\/model\/tiny-family\.ts/);
    const out = execFileSync("npx", ["tsx", "tools/model/tiny-family.ts", "--family", "gemma2", "--out", tiny.dir], {
      cwd: root,
      encoding: "utf8",
    });
    assert.match(out, /tiny gemma2 already at .*model\.onnx/);
  });
});
