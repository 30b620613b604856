import { type ResolvedHook, resolveHooks } from "./hooks.js";
import {
  elemTypeOf,
  type GraphIndex,
  type GraphProto,
  indexGraph,
  loadModel,
  type ModelProto,
  type NodeProto,
  nodesNeeded,
  shapeOf,
  tensorValueInfo,
  type ValueInfoProto,
} from "./onnx.js";

/**
 * Graph cuts at hook points. Both rewrites keep the original graph inputs (so callers feed a
 * rewritten model exactly as the original) and copy initializers untouched (external data stays
 * in the original file). Hook tensors are renamed to the hook's name rather than routed through an
 * Identity, which would copy each activation once more per forward pass.
 */

const asModel = (source: string | ModelProto): ModelProto => (typeof source === "string" ? loadModel(source) : source);

function renamed(node: NodeProto, names: ReadonlyMap<string, string>): NodeProto {
  const rename = (n: string) => names.get(n) ?? n;
  return { ...node, input: (node.input ?? []).map(rename), output: (node.output ?? []).map(rename) };
}

/** The graph made of `keep` (node indices) with tensors renamed, initializers and value_info pruned to what it uses. */
function subgraph(
  graph: GraphProto,
  index: GraphIndex,
  keep: number[],
  names: ReadonlyMap<string, string>,
  extraNodes: NodeProto[] = [],
): GraphProto {
  const node = [...keep.map((i) => renamed(index.nodes[i]!, names)), ...extraNodes];
  const used = new Set(node.flatMap((n) => [...(n.input ?? []), ...(n.output ?? [])]));
  return {
    ...graph,
    node,
    initializer: (graph.initializer ?? []).filter((t) => used.has(t.name ?? "")),
    // Renamed tensors become graph inputs or outputs, which carry their own type.
    valueInfo: (graph.valueInfo ?? []).filter((v) => used.has(v.name ?? "") && !names.has(v.name ?? "")),
  };
}

const hookInfo = (graph: GraphProto, index: GraphIndex, hook: ResolvedHook): ValueInfoProto =>
  tensorValueInfo(hook.name, elemTypeOf(graph, index, hook.tensor), shapeOf(graph, hook.tensor));

/**
 * The model cut after its last hook point: only the nodes needed for the hook tensors remain (no
 * compute is spent on later layers, no logits), and the hook tensors are the graph outputs, named
 * by hook (e.g. "blocks.1.hook_resid_post"), in the order given.
 */
export function truncateAtHooks(source: string | ModelProto, hookNames: readonly string[]): ModelProto {
  const model = asModel(source);
  const graph = model.graph ?? {};
  const hooks = resolveHooks(graph, hookNames);
  const index = indexGraph(graph);
  const keep = nodesNeeded(
    index,
    hooks.map((h) => h.tensor),
  );
  const names = new Map<string, string>();
  const aliases: NodeProto[] = [];
  for (const hook of hooks) {
    // Two hooks can be one tensor (blocks.L.hook_resid_post is blocks.L+1.hook_resid_pre), and a
    // graph input or initializer cannot be renamed; only those get an Identity.
    const first = names.get(hook.tensor);
    if (first === undefined && index.producer.has(hook.tensor)) names.set(hook.tensor, hook.name);
    else aliases.push({ opType: "Identity", name: `/saeflow/${hook.name}/Identity`, input: [first ?? hook.tensor], output: [hook.name] });
  }
  return {
    ...model,
    graph: { ...subgraph(graph, index, keep, names, aliases), output: hooks.map((h) => hookInfo(graph, index, h)) },
  };
}

/**
 * The model from a hook point on: the hook tensor becomes a graph input named by the hook, and
 * the graph computes the logits from it, so a caller can feed a changed activation (an SAE's
 * reconstruction, zeros) in its place. Nodes that the logits need besides the hook tensor stay:
 * for a residual-stream hook that is only the mask and rotary tables, but an attn_out or mlp_out
 * hook is added to the residual stream, which would be recomputed from the start unless it is cut
 * too, so `alsoInputs` names further hook points to turn into inputs (e.g. blocks.L.hook_resid_pre
 * with blocks.L.hook_attn_out, blocks.L.hook_resid_mid with blocks.L.hook_mlp_out).
 */
export function suffixFromHook(source: string | ModelProto, hookName: string, alsoInputs: readonly string[] = []): ModelProto {
  const model = asModel(source);
  const graph = model.graph ?? {};
  const hooks = resolveHooks(graph, [hookName, ...alsoInputs]);
  const index = indexGraph(graph);
  const names = new Map<string, string>();
  for (const hook of hooks) {
    const other = names.get(hook.tensor);
    if (other !== undefined) throw new Error(`hook points "${other}" and "${hook.name}" are the same tensor; give one of them`);
    names.set(hook.tensor, hook.name);
  }
  const outputs = (graph.output ?? []).filter((o) => o.name === "logits");
  if (outputs.length !== 1) throw new Error(`the graph has no "logits" output`);
  const keep = nodesNeeded(index, ["logits"], new Set(names.keys()));
  return {
    ...model,
    graph: {
      ...subgraph(graph, index, keep, names),
      input: [...(graph.input ?? []), ...hooks.map((h) => hookInfo(graph, index, h))],
      output: outputs,
    },
  };
}
