import { readFileSync } from "node:fs";
import onnxProto from "onnx-proto";
import type { onnx as Onnx } from "onnx-proto";

/**
 * ONNX ModelProto access for graph rewrites. Models are decoded with onnx-proto (protobufjs);
 * weights stored as external data stay where they are: a rewrite copies TensorProtos, so their
 * `external_data` entries keep pointing at the original data file and nothing is read from it.
 */

export const onnx = onnxProto.onnx;
export type ModelProto = Onnx.IModelProto;
export type GraphProto = Onnx.IGraphProto;
export type NodeProto = Onnx.INodeProto;
export type TensorProto = Onnx.ITensorProto;
export type ValueInfoProto = Onnx.IValueInfoProto;
export type AttributeProto = Onnx.IAttributeProto;
export const DataType = onnx.TensorProto.DataType;
export const AttributeType = onnx.AttributeProto.AttributeType;

/** protobufjs decodes int64 fields as Long objects when the `long` package is present. */
interface LongLike {
  toNumber(): number;
}
export const int = (v: number | LongLike | null | undefined): number =>
  v === null || v === undefined ? 0 : typeof v === "number" ? v : v.toNumber();

export function loadModel(path: string): ModelProto {
  return onnx.ModelProto.decode(readFileSync(path));
}

export function encodeModel(model: ModelProto): Uint8Array {
  return onnx.ModelProto.encode(model).finish();
}

export const hasExternalData = (model: ModelProto): boolean =>
  (model.graph?.initializer ?? []).some((t) => t.dataLocation === onnx.TensorProto.DataLocation.EXTERNAL);

/** Names of the tensors a node reads, including those its subgraphs (If/Loop/Scan bodies) read from the outer graph. */
function nodeReads(node: NodeProto): string[] {
  const names = (node.input ?? []).filter((n) => n !== "");
  for (const attr of node.attribute ?? []) {
    for (const sub of [attr.g, ...(attr.graphs ?? [])]) {
      if (!sub) continue;
      const local = new Set([...(sub.initializer ?? []).map((t) => t.name ?? ""), ...(sub.input ?? []).map((v) => v.name ?? "")]);
      for (const inner of sub.node ?? []) {
        for (const out of inner.output ?? []) local.add(out);
      }
      for (const inner of sub.node ?? []) names.push(...nodeReads(inner).filter((n) => !local.has(n)));
    }
  }
  return names;
}

/** Which node makes each tensor, and which nodes read it. */
export interface GraphIndex {
  nodes: NodeProto[];
  producer: Map<string, number>;
  consumers: Map<string, number[]>;
  initializers: Map<string, TensorProto>;
  inputs: Map<string, ValueInfoProto>;
}

export function indexGraph(graph: GraphProto): GraphIndex {
  const nodes = graph.node ?? [];
  const producer = new Map<string, number>();
  const consumers = new Map<string, number[]>();
  nodes.forEach((node, i) => {
    for (const out of node.output ?? []) if (out) producer.set(out, i);
    for (const name of nodeReads(node)) {
      const list = consumers.get(name);
      if (list) list.push(i);
      else consumers.set(name, [i]);
    }
  });
  return {
    nodes,
    producer,
    consumers,
    initializers: new Map((graph.initializer ?? []).map((t) => [t.name ?? "", t])),
    inputs: new Map((graph.input ?? []).map((v) => [v.name ?? "", v])),
  };
}

/**
 * Indices (in graph order, which is topological) of the nodes needed to compute `targets`, walking
 * back from them and stopping at `cuts`, graph inputs and initializers.
 */
export function nodesNeeded(index: GraphIndex, targets: Iterable<string>, cuts: ReadonlySet<string> = new Set()): number[] {
  const needed = new Set<number>();
  const stack = [...targets];
  const seen = new Set<string>();
  while (stack.length) {
    const name = stack.pop()!;
    if (seen.has(name) || cuts.has(name)) continue;
    seen.add(name);
    const at = index.producer.get(name);
    if (at === undefined) {
      if (!index.inputs.has(name) && !index.initializers.has(name))
        throw new Error(`tensor "${name}" is made by no node, input or initializer`);
      continue;
    }
    if (needed.has(at)) continue;
    needed.add(at);
    stack.push(...nodeReads(index.nodes[at]!));
  }
  return [...needed].sort((a, b) => a - b);
}

const FLOAT_TYPES = new Set<number>([DataType.FLOAT, DataType.FLOAT16, DataType.BFLOAT16, DataType.DOUBLE]);

/**
 * Element type of a floating-point activation. Exports do not always carry value_info for
 * intermediates, so this walks back through the ops that keep their data input's type (everything
 * a Llama residual stream passes through) to an initializer, a graph input or a Cast.
 */
export function elemTypeOf(graph: GraphProto, index: GraphIndex, tensor: string): number {
  const known = [...(graph.valueInfo ?? []), ...(graph.input ?? []), ...(graph.output ?? [])].find((v) => v.name === tensor);
  const declared = known?.type?.tensorType?.elemType;
  if (declared) return declared;
  const init = index.initializers.get(tensor);
  if (init) return init.dataType ?? DataType.UNDEFINED;
  const at = index.producer.get(tensor);
  const node = at === undefined ? undefined : index.nodes[at];
  if (!node) throw new Error(`cannot tell the element type of "${tensor}"`);
  if (node.opType === "Cast") return int((node.attribute ?? []).find((a) => a.name === "to")?.i);
  if (node.opType === "Constant") return (node.attribute ?? []).find((a) => a.name === "value")?.t?.dataType ?? DataType.UNDEFINED;
  // Where's data inputs are 1 and 2; Gather's data is 0 (its indices are 1).
  const data = node.opType === "Where" ? node.input?.[1] : node.input?.[0];
  if (!data) throw new Error(`cannot tell the element type of "${tensor}" made by ${node.opType} node "${node.name}"`);
  const type = elemTypeOf(graph, index, data);
  if (!FLOAT_TYPES.has(type)) throw new Error(`"${tensor}" is not a floating-point tensor (type ${type})`);
  return type;
}

/** A tensor's declared shape if the export recorded one, as dim_value / dim_param entries. */
export function shapeOf(graph: GraphProto, tensor: string): Onnx.ITensorShapeProto | undefined {
  const known = [...(graph.valueInfo ?? []), ...(graph.input ?? []), ...(graph.output ?? [])].find((v) => v.name === tensor);
  return known?.type?.tensorType?.shape ?? undefined;
}

export function tensorValueInfo(name: string, elemType: number, shape?: Onnx.ITensorShapeProto): ValueInfoProto {
  return { name, type: { tensorType: shape ? { elemType, shape } : { elemType } } };
}
