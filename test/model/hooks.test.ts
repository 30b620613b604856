import assert from "node:assert/strict";
import { after, describe, it } from "node:test";
import { FieldError } from "../../services/common/errors.js";
import { checkHooks, parseHook, resolveHooks } from "../../services/producer/model/hooks.js";
import { type GraphProto, loadModel } from "../../services/producer/model/onnx.js";
import { truncateAtHooks } from "../../services/producer/model/truncate.js";
import { tempTinyLlama } from "./tiny.js";

/** Runs `fn`, expecting a FieldError on hookPoints whose message contains `text`. */
function refuses(fn: () => unknown, text: string): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof FieldError, `expected FieldError, got ${String(err)}`);
    assert.equal(err.field, "hookPoints");
    assert.ok(err.message.includes(text), `"${err.message}" does not name ${text}`);
    return true;
  });
}

describe("hook points", () => {
  const tiny = tempTinyLlama();
  const graph = loadModel(tiny.modelPath).graph!;
  after(() => tiny.remove());

  it("parses TransformerLens names", () => {
    assert.deepEqual(parseHook("blocks.12.hook_resid_post"), { name: "blocks.12.hook_resid_post", layer: 12, kind: "hook_resid_post" });
    assert.equal(parseHook("blocks.0.hook_attn_out").kind, "hook_attn_out");
  });

  it("refuses an unknown hook point, naming it", () => {
    for (const name of [
      "blocks.0.hook_resid",
      "blocks.0.hook_foo",
      "layers.0.hook_resid_post",
      "blocks.x.hook_mlp_out",
      "blocks.0.hook_resid_post.x",
      "",
    ]) {
      refuses(() => parseHook(name), `"${name}"`);
    }
  });

  it("refuses a layer beyond the model, naming the hook point and the layer count", () => {
    refuses(
      () => resolveHooks(graph, ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]),
      `"blocks.2.hook_resid_post": layer 2 is beyond the model, which has 2 layers`,
    );
    refuses(() => truncateAtHooks(tiny.modelPath, ["blocks.7.hook_mlp_out"]), "blocks.7.hook_mlp_out");
    refuses(() => truncateAtHooks(tiny.modelPath, ["blocks.1.hook_nope"]), "blocks.1.hook_nope");
  });

  it("refuses duplicates and an empty list", () => {
    refuses(() => checkHooks(["blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre"], 2), "listed twice");
    refuses(() => checkHooks([], 2), "no hook points");
  });

  it("maps hook points onto the tensors of an optimum Llama export", () => {
    const names = [
      "blocks.0.hook_resid_pre",
      "blocks.0.hook_attn_out",
      "blocks.0.hook_resid_mid",
      "blocks.0.hook_mlp_out",
      "blocks.0.hook_resid_post",
      "blocks.1.hook_resid_pre",
      "blocks.1.hook_resid_post",
    ];
    const tensors = Object.fromEntries(resolveHooks(graph, names).map((h) => [h.name, h.tensor]));
    assert.deepEqual(tensors, {
      "blocks.0.hook_resid_pre": "/model/embed_tokens/Gather_output_0",
      "blocks.0.hook_attn_out": "/model/layers.0/self_attn/o_proj/MatMul_output_0",
      "blocks.0.hook_resid_mid": "/model/layers.0/Add_output_0",
      "blocks.0.hook_mlp_out": "/model/layers.0/mlp/down_proj/MatMul_output_0",
      "blocks.0.hook_resid_post": "/model/layers.0/Add_1_output_0",
      "blocks.1.hook_resid_pre": "/model/layers.0/Add_1_output_0",
      "blocks.1.hook_resid_post": "/model/layers.1/Add_1_output_0",
    });
  });

  it("finds the tensors by structure, not by node numbering or tensor names", () => {
    // Another export numbers its nodes differently, gives o_proj a bias Add, and names tensors otherwise.
    const renamed = new Map<string, string>();
    let n = 0;
    const rename = (t: string) => renamed.get(t) ?? t;
    const nodes = graph.node!.flatMap((node) => {
      const outputs = (node.output ?? []).map((o) => {
        const name = `t${++n}`;
        renamed.set(o, name);
        return name;
      });
      const moved = {
        ...node,
        name: (node.name ?? "").replace(/\/Add(_1)?$/, "/Add_9$1"),
        input: (node.input ?? []).map(rename),
        output: outputs,
      };
      if (node.name !== "/model/layers.1/self_attn/o_proj/MatMul") return [moved];
      const bias = {
        opType: "Add",
        name: "/model/layers.1/self_attn/o_proj/Add",
        input: [outputs[0]!, outputs[0]!],
        output: ["o_proj_with_bias"],
      };
      renamed.set(node.output![0]!, "o_proj_with_bias");
      return [moved, bias];
    });
    const variant: GraphProto = { ...graph, node: nodes, output: graph.output!.map((o) => ({ ...o, name: rename(o.name ?? "") })) };
    const tensors = Object.fromEntries(
      resolveHooks(variant, ["blocks.1.hook_attn_out", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]).map((h) => [
        h.name,
        h.tensor,
      ]),
    );
    assert.equal(tensors["blocks.1.hook_attn_out"], "o_proj_with_bias");
    assert.equal(tensors["blocks.1.hook_resid_pre"], renamed.get("/model/layers.0/Add_1_output_0"));
    assert.equal(tensors["blocks.1.hook_resid_post"], renamed.get("/model/layers.1/Add_1_output_0"));
  });
});
