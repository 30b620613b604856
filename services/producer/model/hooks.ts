import { FieldError } from "../../common/errors.js";
import { elemTypeOf, type GraphIndex, type GraphProto, indexGraph, int } from "./onnx.js";

/**
 * Hook points named as interpretability tools (TransformerLens, SAELens) name them, mapped onto
 * the tensors of a Llama-family ONNX export (optimum / torch.onnx naming: `/model/layers.L/...`).
 * The mapping goes by graph structure inside each layer's name scope, not by exact tensor names,
 * since exports differ in node numbering.
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

/** The name scope of each decoder layer, e.g. "/model/layers.0/", found from node names. */
function layerScopes(graph: GraphProto): string[] {
  const scopes = new Map<number, string>();
  for (const node of graph.node ?? []) {
    const m = /^(.*?\/layers\.)(\d+)\//.exec(node.name ?? "");
    if (m) scopes.set(Number(m[2]), `${m[1]}${m[2]}/`);
  }
  const layers = scopes.size;
  for (let l = 0; l < layers; l++) {
    if (!scopes.has(l))
      throw new Error(`the graph's layer scopes are not numbered 0..${layers - 1} (layer ${l} missing); is it a Llama-family export?`);
  }
  return [...Array(layers).keys()].map((l) => scopes.get(l)!);
}

/** The one tensor leaving the nodes under `scope` (e.g. an o_proj MatMul, or MatMul + Add with a bias). */
function scopeExit(index: GraphIndex, scope: string, hook: string): string {
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
      `hook point "${hook}": expected one tensor leaving the nodes named "${scope}*", found ${exits.size}; is it a Llama-family export?`,
    );
  }
  return [...exits][0]!;
}

/** The residual Add that reads `branch` (a sublayer's output); returns the Add's output and its other input. */
function residualAdd(index: GraphIndex, branch: string, hook: string): { sum: string; residual: string } {
  const adds = (index.consumers.get(branch) ?? []).map((i) => index.nodes[i]!).filter((n) => n.opType === "Add");
  const add = adds[0];
  if (adds.length !== 1 || !add)
    throw new Error(`hook point "${hook}": expected one residual Add reading "${branch}", found ${adds.length}`);
  const inputs = add.input ?? [];
  const residual = inputs[0] === branch ? inputs[1] : inputs[0];
  return { sum: add.output![0]!, residual: residual! };
}

/**
 * Steps back over Identity and Casts to the type they already have: a float32 export reads the
 * residual stream through the norm's no-op Cast, and the canonical tensor is the one before it.
 */
function throughNoOps(graph: GraphProto, index: GraphIndex, tensor: string): string {
  for (;;) {
    const at = index.producer.get(tensor);
    const node = at === undefined ? undefined : index.nodes[at];
    const input = node?.input?.[0];
    if (!node || !input) return tensor;
    const to = (node.attribute ?? []).find((a) => a.name === "to")?.i;
    const noOp = node.opType === "Identity" || (node.opType === "Cast" && int(to) === elemTypeOf(graph, index, input));
    if (!noOp) return tensor;
    tensor = input;
  }
}

/** Checks `names` against the graph and finds the tensor behind each. */
export function resolveHooks(graph: GraphProto, names: readonly string[]): ResolvedHook[] {
  const scopes = layerScopes(graph);
  const hooks = checkHooks(names, scopes.length);
  const index = indexGraph(graph);
  return hooks.map((hook) => {
    const scope = scopes[hook.layer]!;
    const attnOut = () => scopeExit(index, `${scope}self_attn/o_proj/`, hook.name);
    const mlpOut = () => scopeExit(index, `${scope}mlp/down_proj/`, hook.name);
    const tensors: Record<HookKind, () => string> = {
      hook_resid_pre: () => throughNoOps(graph, index, residualAdd(index, attnOut(), hook.name).residual),
      hook_attn_out: attnOut,
      hook_resid_mid: () => residualAdd(index, attnOut(), hook.name).sum,
      hook_mlp_out: mlpOut,
      hook_resid_post: () => residualAdd(index, mlpOut(), hook.name).sum,
    };
    return { ...hook, tensor: tensors[hook.kind]() };
  });
}
