import onnxProto from "onnx-proto";

const { onnx } = onnxProto;
type INode = onnxProto.onnx.INodeProto;
type IValueInfo = onnxProto.onnx.IValueInfoProto;
type ITensor = onnxProto.onnx.ITensorProto;

/**
 * One part of a graph cut into stages: its model, the tensors it is fed (graph inputs and what
 * earlier stages made) and those it returns (graph outputs and what later stages take), and
 * whether it must run on one thread.
 */
export interface Stage {
  model: Uint8Array;
  serial: boolean;
  inputs: string[];
  outputs: string[];
  /** Outputs later stages take whose shape can change from run to run (they follow a fed count or id list). */
  varying: string[];
}

/** What a GraphBuilder holds, for cutting it into stages. */
export interface GraphParts {
  name: string;
  nodes: readonly INode[];
  inputs: readonly IValueInfo[];
  outputs: readonly IValueInfo[];
  initializers: readonly ITensor[];
  /** Element type of every tensor. */
  types: ReadonlyMap<string, number>;
  /** Nodes that must run on one thread. */
  serial: ReadonlySet<INode>;
  /** Nodes to place as late as their readers allow. */
  late: ReadonlySet<INode>;
  opset: number;
  irVersion: number;
}

const INTEGER = new Set<number>([onnx.TensorProto.DataType.INT64, onnx.TensorProto.DataType.INT32]);

/** A fed tensor whose values or shape set the shapes of what follows: an id list, a count, a symbolic dimension. */
function variesWithFeeds(input: IValueInfo): boolean {
  const tensor = input.type?.tensorType;
  return INTEGER.has(tensor?.elemType ?? 0) || (tensor?.shape?.dim ?? []).some((d) => d.dimParam);
}

/**
 * Cuts a graph into stages that alternate between nodes that may use every thread and nodes that
 * must run on one (`serial`). Each node first takes the earliest stage of its kind after its
 * inputs', so there are as few stages as the graph allows; then some move later (latest()) so that
 * less is handed on. Nodes that read only constants are copied into every stage that needs them
 * rather than passed between stages. Undefined when no node is serial: the graph runs whole.
 */
export function cutStages(g: GraphParts): Stage[] | undefined {
  if (g.serial.size === 0) return undefined;
  const constant = new Set(g.initializers.map((t) => t.name!));
  const producer = new Map<string, INode>();
  const stageOf = new Map<INode, number>();
  const varies = new Set(g.inputs.filter(variesWithFeeds).map((i) => i.name!));
  const at = new Map<string, number>(); // stage that makes each non-constant tensor
  for (const node of g.nodes) {
    const inputs = node.input!.filter((i) => i);
    for (const out of node.output!) producer.set(out, node);
    if (inputs.every((i) => constant.has(i))) {
      for (const out of node.output!) constant.add(out);
      continue;
    }
    const parity = g.serial.has(node) ? 1 : 0;
    let s = Math.max(0, ...inputs.map((i) => at.get(i) ?? 0));
    if (s % 2 !== parity) s++;
    stageOf.set(node, s);
    const varying = inputs.some((i) => varies.has(i));
    for (const out of node.output!) {
      at.set(out, s);
      if (varying) varies.add(out);
    }
  }
  const fixed = g.outputs.find((o) => constant.has(o.name!));
  if (fixed) throw new Error(`graph ${g.name}: output ${fixed.name} is a constant; stages hold no such output`);
  const count = Math.max(...stageOf.values()) + 1;
  latest(g, stageOf, count);
  const graphOutputs = new Map(g.outputs.map((o) => [o.name!, o]));
  const graphInputs = new Map(g.inputs.map((i) => [i.name!, i]));
  const initializers = new Map(g.initializers.map((t) => [t.name!, t]));
  // Where each tensor is read: a later stage that reads it makes it cross.
  const lastReader = new Map<string, number>();
  for (const [node, s] of stageOf) for (const i of node.input!) if (i) lastReader.set(i, Math.max(lastReader.get(i) ?? -1, s));

  return Array.from({ length: count }, (_, s) => {
    const own = g.nodes.filter((n) => stageOf.get(n) === s);
    const nodes = withConstants(own, g.nodes, producer, constant, stageOf);
    const made = new Set(nodes.flatMap((n) => n.output!));
    const read = [...new Set(nodes.flatMap((n) => n.input!.filter((i) => i)))];
    const inputs = read.filter((i) => !made.has(i) && !initializers.has(i));
    const crossing = own.flatMap((n) => n.output!).filter((o) => (lastReader.get(o) ?? -1) > s);
    const outputs = [...new Set([...own.flatMap((n) => n.output!).filter((o) => graphOutputs.has(o)), ...crossing])];
    const info = (name: string): IValueInfo =>
      graphInputs.get(name) ?? graphOutputs.get(name) ?? { name, type: { tensorType: { elemType: g.types.get(name)! } } };
    const model = onnx.ModelProto.create({
      irVersion: g.irVersion,
      producerName: "saeflow",
      opsetImport: [{ domain: "", version: g.opset }],
      graph: {
        name: `${g.name}_stage${s}`,
        node: nodes,
        input: inputs.map(info),
        output: outputs.map(info),
        initializer: read.filter((i) => initializers.has(i)).map((i) => initializers.get(i)!),
      },
    });
    return {
      model: onnx.ModelProto.encode(model).finish(),
      serial: s % 2 === 1,
      inputs,
      outputs,
      varying: crossing.filter((o) => varies.has(o)),
    };
  });
}

/**
 * Moves a node to the last stage of its kind before its first reader when that hands on less: a
 * one-thread node (the rows a later scatter adds are gathered there, not before it), a node built to
 * be late, or a node that reads nothing made by another node (Adam's decay of the moments, made
 * where it is used rather than handed on). Any other node stays where it is, since its inputs would
 * cross instead of its outputs.
 */
function latest(g: GraphParts, stageOf: Map<INode, number>, count: number): void {
  const lastOf = (parity: number) => (count % 2 === (parity === 1 ? 0 : 1) ? count - 1 : count - 2);
  const readers = new Map<string, INode[]>();
  const made = new Set<string>();
  for (const node of stageOf.keys()) {
    for (const i of node.input!) if (i) readers.set(i, [...(readers.get(i) ?? []), node]);
    for (const o of node.output!) made.add(o);
  }
  for (const node of [...stageOf.keys()].reverse()) {
    const parity = g.serial.has(node) ? 1 : 0;
    if (parity === 0 && !g.late.has(node) && node.input!.some((i) => made.has(i))) continue;
    let bound = lastOf(parity);
    for (const reader of node.output!.flatMap((o) => readers.get(o) ?? [])) {
      const t = stageOf.get(reader)!;
      bound = Math.min(bound, t % 2 === parity ? t : t - 1);
    }
    stageOf.set(node, Math.max(stageOf.get(node)!, bound));
  }
}

/** `own` with the constant-only nodes it reads (transitively), in graph order. */
function withConstants(
  own: readonly INode[],
  all: readonly INode[],
  producer: ReadonlyMap<string, INode>,
  constant: ReadonlySet<string>,
  staged: ReadonlyMap<INode, number>,
): INode[] {
  const keep = new Set(own);
  const visit = (name: string) => {
    const node = producer.get(name);
    if (!node || staged.has(node) || keep.has(node) || !constant.has(name)) return;
    keep.add(node);
    node.input!.forEach((i) => i && visit(i));
  };
  for (const node of own) node.input!.forEach((i) => i && visit(i));
  return all.filter((n) => keep.has(n));
}
