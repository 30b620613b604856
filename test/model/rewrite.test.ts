import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { statSync } from "node:fs";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import * as ort from "onnxruntime-node";
import { HOOK_KINDS } from "../../services/producer/model/hooks.js";
import { encodeModel, loadModel, type ModelProto, onnx } from "../../services/producer/model/onnx.js";
import { openHookSession, sessionFor } from "../../services/producer/model/session.js";
import { suffixFromHook, truncateAtHooks } from "../../services/producer/model/truncate.js";
import { checkSuffix, checkTruncation, maxDiff, sampleFeeds } from "../../tools/model/check.js";
import { saveModel } from "../../tools/model/save.js";
import { tempTinyLlama } from "./tiny.js";

const root = join(import.meta.dirname, "../..");
const nodeNames = (m: ModelProto) => (m.graph?.node ?? []).map((n) => n.name ?? "");
const initializerBytes = (m: ModelProto) => (m.graph?.initializer ?? []).reduce((sum, t) => sum + (t.rawData?.byteLength ?? 0), 0);

describe("model rewrites", () => {
  const tiny = tempTinyLlama();
  const original = loadModel(tiny.modelPath);
  const last = tiny.params.layers - 1;
  after(() => tiny.remove());

  it("truncated models return the original's tensors exactly at every hook kind, first and last layer", async () => {
    for (const layer of [0, last]) {
      for (const kind of HOOK_KINDS) {
        const hook = `blocks.${layer}.${kind}`;
        const diffs = await checkTruncation(tiny.modelPath, truncateAtHooks(original, [hook]), [hook]);
        assert.deepEqual(diffs, { [hook]: 0 });
      }
    }
  });

  it("one truncated model feeds every hook point from one forward pass", async () => {
    const hooks = [last, 0].flatMap((l) => HOOK_KINDS.map((k) => `blocks.${l}.${k}`));
    const truncated = truncateAtHooks(original, hooks);
    assert.deepEqual(
      truncated.graph!.output!.map((o) => o.name),
      hooks,
    );
    const diffs = await checkTruncation(tiny.modelPath, truncated, hooks);
    assert.deepEqual(diffs, Object.fromEntries(hooks.map((h) => [h, 0])));
  });

  it("truncation drops later layers, the head and their weights, and keeps the inputs", () => {
    const truncated = truncateAtHooks(original, ["blocks.0.hook_resid_post"]);
    const names = nodeNames(truncated);
    assert.ok(names.some((n) => n.startsWith("/model/layers.0/")));
    assert.ok(
      !names.some((n) => n.startsWith("/model/layers.1/") || n.startsWith("/model/norm/") || n.startsWith("/lm_head/")),
      "later nodes remain",
    );
    assert.deepEqual(
      truncated.graph!.output!.map((o) => o.name),
      ["blocks.0.hook_resid_post"],
    );
    assert.deepEqual(
      truncated.graph!.input!.map((i) => i.name),
      ["input_ids", "attention_mask", "position_ids"],
    );
    const kept = new Set(truncated.graph!.initializer!.map((t) => t.name));
    assert.ok(!kept.has("model.layers.1.input_layernorm.weight") && !kept.has("model.norm.weight"));
    // The lm_head table (vocab x d_model) is gone; only the embedding table remains of the large ones.
    const table = tiny.params.vocabSize * tiny.params.dModel * 4;
    assert.ok(initializerBytes(truncated) < 1.5 * table && initializerBytes(original) > 2 * table);
  });

  it("prefix → suffix reproduces the original logits exactly", async () => {
    const cuts: Array<[string, string[]]> = [
      ["blocks.0.hook_resid_pre", []],
      ["blocks.0.hook_resid_post", []],
      [`blocks.${last}.hook_resid_post`, []],
      [`blocks.${last}.hook_attn_out`, [`blocks.${last}.hook_resid_pre`]],
      ["blocks.0.hook_mlp_out", ["blocks.0.hook_resid_mid"]],
      ["blocks.0.hook_attn_out", []],
    ];
    for (const [hook, also] of cuts) {
      const diff = await checkSuffix(tiny.modelPath, truncateAtHooks(original, [hook, ...also]), suffixFromHook(original, hook, also));
      assert.equal(diff, 0, `through ${hook}`);
    }
  });

  it("the suffix starts at the hook: earlier layers are gone and the hook tensor is an input", () => {
    const suffix = suffixFromHook(original, "blocks.1.hook_resid_pre");
    assert.ok(!nodeNames(suffix).some((n) => n.startsWith("/model/layers.0/") || n.startsWith("/model/embed_tokens/")));
    assert.deepEqual(
      suffix.graph!.input!.map((i) => i.name),
      ["input_ids", "attention_mask", "position_ids", "blocks.1.hook_resid_pre"],
    );
    assert.equal(suffix.graph!.input![3]!.type!.tensorType!.elemType, onnx.TensorProto.DataType.FLOAT);
    assert.deepEqual(
      suffix.graph!.output!.map((o) => o.name),
      ["logits"],
    );
    const attn = suffixFromHook(original, "blocks.1.hook_attn_out", ["blocks.1.hook_resid_pre"]);
    assert.ok(!nodeNames(attn).some((n) => n.startsWith("/model/layers.0/") || n.startsWith("/model/layers.1/self_attn/")));
    assert.throws(() => suffixFromHook(original, "blocks.1.hook_resid_pre", ["blocks.0.hook_resid_post"]), /same tensor/);
  });

  it("zero ablation through the suffix changes the logits", async () => {
    const hook = "blocks.1.hook_mlp_out";
    const also = ["blocks.1.hook_resid_mid"];
    const [head, tail] = await Promise.all([
      sessionFor(truncateAtHooks(original, [hook, ...also]), tiny.dir),
      sessionFor(suffixFromHook(original, hook, also), tiny.dir),
    ]);
    try {
      const feeds = sampleFeeds(head.inputNames, tiny.params.vocabSize, 1, 8);
      const cut = await head.run(feeds);
      const clean = await tail.run({ ...feeds, ...cut });
      const activation = cut[hook]!;
      const zeros = new ort.Tensor("float32", new Float32Array(activation.size), activation.dims);
      const ablated = await tail.run({ ...feeds, ...cut, [hook]: zeros });
      assert.ok(maxDiff(clean.logits!.data as Float32Array, ablated.logits!.data as Float32Array) > 1e-4);
    } finally {
      await Promise.all([head.release(), tail.release()]);
    }
  });

  it("models with external data are rewritten without reading the weights, and run", async () => {
    const ext = tempTinyLlama({ externalData: true });
    try {
      const hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"];
      const truncated = truncateAtHooks(ext.modelPath, hooks);
      for (const t of truncated.graph!.initializer!) {
        if (t.dims!.length === 0) continue;
        assert.equal(t.dataLocation, onnx.TensorProto.DataLocation.EXTERNAL, `${t.name} left external data`);
        assert.ok(!t.rawData?.byteLength);
        assert.equal(t.externalData!.find((e) => e.key === "location")?.value, "model.onnx_data");
      }
      assert.ok(encodeModel(truncated).byteLength < 100_000);
      assert.deepEqual(await checkTruncation(ext.modelPath, truncated, hooks), {
        "blocks.0.hook_mlp_out": 0,
        "blocks.1.hook_resid_post": 0,
      });

      // Written beside the data file, it loads from its path too; elsewhere it is refused by name.
      const beside = join(ext.dir, "truncated.onnx");
      saveModel(truncated, beside, ext.dir);
      assert.ok(statSync(beside).size < 100_000);
      const session = await ort.InferenceSession.create(beside);
      assert.deepEqual(session.outputNames, hooks);
      await session.release();
      assert.throws(() => saveModel(truncated, join(tiny.dir, "elsewhere.onnx"), ext.dir), /external data in .*write it into that folder/);

      const hooked = await openHookSession(ext.modelPath, ["blocks.0.hook_resid_pre"]);
      assert.deepEqual(hooked.outputNames, ["blocks.0.hook_resid_pre"]);
      await hooked.release();
    } finally {
      ext.remove();
    }
  });

  it("rewrite CLI writes the model and checks it against the original", () => {
    const out = join(tiny.dir, "cli.onnx");
    const run = (...args: string[]) =>
      execFileSync("npx", ["tsx", "tools/model/rewrite.ts", "--model", tiny.modelPath, "--out", out, "--check", ...args], {
        cwd: root,
        encoding: "utf8",
      });
    assert.match(
      run("--hooks", "blocks.0.hook_resid_post,blocks.1.hook_attn_out"),
      /blocks\.1\.hook_attn_out: max abs diff 0\n.*check passed/s,
    );
    assert.deepEqual(
      loadModel(out).graph!.output!.map((o) => o.name),
      ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out"],
    );
    assert.match(run("--suffix", "blocks.1.hook_resid_pre"), /logits through blocks\.1\.hook_resid_pre: max abs diff 0\n.*check passed/s);
    assert.throws(
      () =>
        execFileSync(
          "npx",
          ["tsx", "tools/model/rewrite.ts", "--model", tiny.modelPath, "--out", out, "--hooks", "blocks.9.hook_resid_post"],
          { cwd: root, stdio: "pipe" },
        ),
      (err: Error & { stderr?: Buffer }) => {
        assert.match(String(err.stderr), /blocks\.9\.hook_resid_post/);
        return true;
      },
    );
  });
});
