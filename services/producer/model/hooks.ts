import { FieldError } from "../../common/errors.js";
import { detectLayout, type Layout, layerScopes } from "./layouts.js";
import { elemTypeOf, type GraphIndex, type GraphProto, indexGraph, int, type NodeProto } from "./onnx.js";

/**
 * Hook points named as interpretability tools (TransformerLens, SAELens) name them, mapped onto
 * the tensors of an optimum ONNX export of Llama, Gemma 2, Qwen2, Mistral, GPT-2 or GPT-NeoX
 * (torch.onnx naming; layouts.ts says which tensor each name denotes per family). The mapping
 * goes by graph structure inside each layer's name scope, not by exact tensor names, since
 * exports differ in node numbering.
 */

export const HOOK_KINDS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"] as const;
export type HookKind = (typeof HOOK_KINDS)[number];

export interface HookPoint {
  /** As configured, e.g. "blocks.3.hook_resid_post"; also the graph output/input name after a rewrite. */
  name: string;
  layer: number;
  kind: HookKind;
}

export interface ResolvedHook extends HookPoint {
  /** The tensor in the original graph, e.g. "/model/layers.3/Add_1_output_0". */
  tensor: string;
}

/** Config errors name the config field and the offending hook point. */
const FIELD = "hookPoints";
const SYNTAX = /^blocks\.(\d+)\.(hook_[a-z_]+)$/;
const isKind = (s: string): s is HookKind => (HOOK_KINDS as readonly string[]).includes(s);

export function parseHook(name: string): HookPoint {
  const m = SYNTAX.exec(name);
  if (!m || !isKind(m[2]!)) {
    throw new FieldError(FIELD, `unknown hook point "${name}": expected blocks.<layer>.<kind> with kind one of ${HOOK_KINDS.join(", ")}`);
  }
  return { name, layer: Number(m[1]), kind: m[2] };
}

/** Parses and checks hook points against a model with `layers` layers; duplicates are an error too. */
export function checkHooks(names: readonly string[], layers: number): HookPoint[] {
  if (names.length === 0) throw new FieldError(FIELD, "no hook points given");
  const seen = new Set<string>();
  return names.map((name) => {
    const hook = parseHook(name);
    if (hook.layer >= layers) {
      throw new FieldError(
        FIELD,
        `hook point "${name}": layer ${hook.layer} is beyond the model, which has ${layers} layers (0..${layers - 1})`,
      );
    }
    if (seen.has(name)) throw new FieldError(FIELD, `hook point "${name}" is listed twice`);
    seen.add(name);
    return hook;
  });
}

/** The one tensor leaving the nodes under `scope` (e.g. an o_proj MatMul, or MatMul + Add with a bias). */
function scopeExit(index: GraphIndex, scope: string, hook: string, layout: Layout): string {
  const inside = new Set<number>();
  index.nodes.forEach((n, i) => {
    if ((n.name ?? "").startsWith(scope)) inside.add(i);
  });
  const exits = new Set<string>();
  for (const i of inside) {
    for (const out of index.nodes[i]!.output ?? []) {
      if ((index.consumers.get(out) ?? []).some((c) => !inside.has(c))) exits.add(out);
    }
  }
  if (exits.size !== 1) {
    throw new Error(
      `hook point "${hook}": expected one tensor leaving the nodes named "${scope}*" (${layout.families} layout), found ${exits.size}` +
        (inside.size === 0 ? ": there are no such nodes" : ""),
    );
  }
  return [...exits][0]!;
}

interface ResidualAdd {
  node: number;
  sum: string;
  /** The Add's other input. */
  other: string;
}

/** The residual Add that reads `branch` (a sublayer's output, or attention + MLP in a parallel layer). */
function residualAdd(index: GraphIndex, branch: string, hook: string): ResidualAdd {
  const adds = (index.consumers.get(branch) ?? []).filter((i) => index.nodes[i]!.opType === "Add");
  const at = adds[0];
  if (adds.length !== 1 || at === undefined) {
    throw new Error(`hook point "${hook}": expected one residual Add reading "${branch}", found ${adds.length}`);
  }
  const add = index.nodes[at]!;
  const inputs = add.input ?? [];
  return { node: at, sum: add.output![0]!, other: (inputs[0] === branch ? inputs[1] : inputs[0])! };
}

const isNoOp = (graph: GraphProto, index: GraphIndex, node: NodeProto): boolean => {
  const input = node.input?.[0];
  if (node.opType === "Identity") return true;
  const to = (node.attribute ?? []).find((a) => a.name === "to")?.i;
  return node.opType === "Cast" && input !== undefined && int(to) === elemTypeOf(graph, index, input);
};

/**
 * Steps back over Identity and Casts to the type they already have: a float32 export reads the
 * residual stream through the norm's no-op Cast, and the canonical tensor is the one before it.
 */
function throughNoOps(graph: GraphProto, index: GraphIndex, tensor: string): string {
  for (;;) {
    const at = index.producer.get(tensor);
    const node = at === undefined ? undefined : index.nodes[at];
    const input = node?.input?.[0];
    if (!node || !input || !isNoOp(graph, index, node)) return tensor;
    tensor = input;
  }
}

/** The nodes that read `tensor`, directly or through no-op Casts and Identities. */
function readers(graph: GraphProto, index: GraphIndex, tensor: string): number[] {
  return (index.consumers.get(tensor) ?? []).flatMap((i) => {
    const node = index.nodes[i]!;
    return isNoOp(graph, index, node) ? readers(graph, index, node.output![0]!) : [i];
  });
}

/** A layer's residual stream: the tensors around its residual Adds. */
interface Stream {
  pre: string;
  /** Absent in a layer whose MLP reads resid_pre (parallel attention and MLP). */
  mid: string | undefined;
  post: string;
}

/**
 * The residual stream from the Adds that read attn_out and mlp_out. A sequential layer adds
 * attention to resid_pre (resid_mid), then the MLP to resid_mid (resid_post). GPT-NeoX's parallel
 * layer computes mlp_out + attn_out first and adds that to resid_pre; a layer whose attention Add
 * no sublayer reads is parallel too, whatever order it sums in.
 */
function residualStream(graph: GraphProto, index: GraphIndex, attnOut: string, mlpOut: string, hook: string): Stream {
  const attnAdd = residualAdd(index, attnOut, hook);
  if (throughNoOps(graph, index, attnAdd.other) === mlpOut) {
    const post = residualAdd(index, attnAdd.sum, hook);
    return { pre: throughNoOps(graph, index, post.other), mid: undefined, post: post.sum };
  }
  const mlpAdd = residualAdd(index, mlpOut, hook);
  if (throughNoOps(graph, index, mlpAdd.other) !== attnAdd.sum) {
    throw new Error(
      `hook point "${hook}": the residual Add after the MLP ("${mlpAdd.sum}") does not add to the one after attention ("${attnAdd.sum}")`,
    );
  }
  const mlpReadsMid = readers(graph, index, attnAdd.sum).some((i) => i !== mlpAdd.node);
  return { pre: throughNoOps(graph, index, attnAdd.other), mid: mlpReadsMid ? attnAdd.sum : undefined, post: mlpAdd.sum };
}

/** The layout the hook mapping reads `graph` as, e.g. "GPT-2"; throws naming what it looked for. */
export function modelLayout(graph: GraphProto): Layout {
  return detectLayout(graph, layerScopes(graph)[0]!);
}

/** Checks `names` against the graph and finds the tensor behind each. */
export function resolveHooks(graph: GraphProto, names: readonly string[]): ResolvedHook[] {
  const scopes = layerScopes(graph);
  const hooks = checkHooks(names, scopes.length);
  const layout = detectLayout(graph, scopes[0]!);
  const index = indexGraph(graph);
  return hooks.map((hook) => {
    const scope = scopes[hook.layer]!;
    const attnOut = () => scopeExit(index, scope + layout.attnOut, hook.name, layout);
    const mlpOut = () => scopeExit(index, scope + layout.mlpOut, hook.name, layout);
    const stream = () => residualStream(graph, index, attnOut(), mlpOut(), hook.name);
    const mid = () => {
      const tensor = stream().mid;
      if (tensor !== undefined) return tensor;
      throw new FieldError(
        FIELD,
        `hook point "${hook.name}": this model's attention and MLP run in parallel (GPT-NeoX's use_parallel_residual): ` +
          `both read resid_pre and add to resid_post, so there is no resid_mid; use hook_resid_pre, hook_attn_out, hook_mlp_out or hook_resid_post`,
      );
    };
    const tensors: Record<HookKind, () => string> = {
      hook_resid_pre: () => stream().pre,
      hook_attn_out: attnOut,
      hook_resid_mid: mid,
      hook_mlp_out: mlpOut,
      hook_resid_post: () => stream().post,
    };
    return { ...hook, tensor: tensors[hook.kind]() };
  });
}
