import onnxProto from "onnx-proto";
import { cutStages, type Stage } from "./stages.js";

const { onnx } = onnxProto;
type INode = onnxProto.onnx.INodeProto;
type IValueInfo = onnxProto.onnx.IValueInfoProto;
type ITensor = onnxProto.onnx.ITensorProto;
type IAttribute = onnxProto.onnx.IAttributeProto;

/** ONNX element types the step graphs use. */
export const F32 = onnx.TensorProto.DataType.FLOAT;
export const F16 = onnx.TensorProto.DataType.FLOAT16;
export const I64 = onnx.TensorProto.DataType.INT64;
/** Index arithmetic on a GPU: WebGPU has no 64-bit integer kernels beyond Gather's and ScatterND's indices. */
export const I32 = onnx.TensorProto.DataType.INT32;
/** bf16 batches go in as pairs of raw 16-bit words (onnxruntime-node has no bf16 tensors). */
export const U32 = onnx.TensorProto.DataType.UINT32;
/** Comparisons' results. */
export const BOOL = onnx.TensorProto.DataType.BOOL;
export type ElemType = typeof F32 | typeof F16 | typeof I64 | typeof I32 | typeof U32 | typeof BOOL;

/** Ops whose outputs are int64 whatever their inputs, and comparisons, whose outputs are bool. */
const I64_OUT = new Set(["Shape", "ArgMax", "ArgMin", "NonZero"]);
const BOOL_OUT = new Set(["Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"]);

/** A dimension: a fixed size or a symbolic name (dynamic at run time). */
export type Dim = number | string;
type AttrValue = number | number[] | string | { float: number } | { floats: number[] };

/**
 * The ORT opset the step graphs target: ScatterND's reduction="add" needs 16, ReduceMax/ReduceL2 with
 * axes as an input need 18. IR version 8 is what ORT 1.30 accepts with opset 18.
 */
const OPSET = 18;
const IR_VERSION = 8;

function attribute(name: string, value: AttrValue): IAttribute {
  const T = onnx.AttributeProto.AttributeType;
  if (typeof value === "string") return { name, type: T.STRING, s: new TextEncoder().encode(value) };
  if (typeof value === "number") return { name, type: T.INT, i: value };
  if (Array.isArray(value)) return { name, type: T.INTS, ints: value };
  if ("float" in value) return { name, type: T.FLOAT, f: value.float };
  return { name, type: T.FLOATS, floats: value.floats };
}

function valueInfo(name: string, elemType: ElemType, dims: readonly Dim[]): IValueInfo {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: dims.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

/**
 * Builds an ONNX graph by name: every op returns the name of its output so a graph reads like the
 * math it computes. Constants become initializers.
 */
export class GraphBuilder {
  private readonly nodes: INode[] = [];
  private readonly inputs: IValueInfo[] = [];
  private readonly outputs: IValueInfo[] = [];
  private readonly initializers: ITensor[] = [];
  private readonly used = new Set<string>();
  /** Element type of every named tensor, for the inputs and outputs of stages. */
  private readonly types = new Map<string, ElemType>();
  /** Nodes that must run on one thread: scatter-adds whose rows may repeat, and what feeds them only (see serially()). */
  private readonly serialNodes = new Set<INode>();
  private inSerial = false;
  /** Nodes to stage as late as their readers allow (see late()). */
  private readonly lateNodes = new Set<INode>();
  private inLate = false;

  constructor(private readonly graphName: string) {}

  /** A fresh name based on `hint`. */
  private fresh(hint: string): string {
    let name = hint;
    for (let i = 1; this.used.has(name); i++) name = `${hint}_${i}`;
    this.used.add(name);
    return name;
  }

  input(name: string, elemType: ElemType, dims: readonly Dim[]): string {
    if (this.used.has(name)) throw new Error(`graph ${this.graphName}: duplicate name ${name}`);
    this.used.add(name);
    this.inputs.push(valueInfo(name, elemType, dims));
    this.types.set(name, elemType);
    return name;
  }

  /**
   * Marks `value` as the graph output `name`. Name the producing op `name` to avoid the Identity
   * (a full copy) this otherwise adds.
   */
  output(value: string, name: string, elemType: ElemType, dims: readonly Dim[]): void {
    if (value !== name && this.used.has(name)) throw new Error(`graph ${this.graphName}: output name ${name} is taken`);
    const out = value === name ? value : this.op("Identity", [value], {}, name);
    this.outputs.push(valueInfo(out, elemType, dims));
  }

  /** A float32 constant; a scalar when `dims` is empty. */
  constF(values: number | readonly number[], dims: readonly number[] = [], hint = "c"): string {
    const name = this.fresh(hint);
    const floatData = typeof values === "number" ? [values] : [...values];
    this.initializers.push({ name, dataType: F32, dims: [...dims], floatData });
    this.types.set(name, F32);
    return name;
  }

  /** An int64 constant (shapes, axes, indices). */
  constI(values: readonly number[], dims: readonly number[] = [values.length], hint = "i"): string {
    const name = this.fresh(hint);
    this.initializers.push({ name, dataType: I64, dims: [...dims], int64Data: [...values] });
    this.types.set(name, I64);
    return name;
  }

  /** An int32 constant (index arithmetic that stays on a GPU). */
  constI32(values: readonly number[], dims: readonly number[] = [values.length], hint = "i32"): string {
    const name = this.fresh(hint);
    this.initializers.push({ name, dataType: I32, dims: [...dims], int32Data: [...values] });
    this.types.set(name, I32);
    return name;
  }

  /** A uint32 constant. */
  constU32(values: readonly number[], dims: readonly number[] = [values.length], hint = "u32"): string {
    const name = this.fresh(hint);
    this.initializers.push({ name, dataType: U32, dims: [...dims], uint64Data: [...values] });
    this.types.set(name, U32);
    return name;
  }

  /** One node with one output. */
  op(opType: string, inputs: readonly string[], attrs: Record<string, AttrValue> = {}, hint?: string): string {
    return this.opN(opType, inputs, 1, attrs, hint)[0]!;
  }

  /** One node with `count` outputs. */
  opN(opType: string, inputs: readonly string[], count: number, attrs: Record<string, AttrValue> = {}, hint?: string): string[] {
    const base = hint ?? opType.toLowerCase();
    const output = Array.from({ length: count }, (_, i) => this.fresh(count === 1 ? base : `${base}_${i}`));
    this.nodes.push({
      opType,
      name: this.fresh(`n_${base}`),
      input: [...inputs],
      output,
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    output.forEach((out, i) => this.types.set(out, this.outputType(opType, inputs, attrs, i)));
    if (this.inSerial) this.serialNodes.add(this.nodes.at(-1)!);
    if (this.inLate) this.lateNodes.add(this.nodes.at(-1)!);
    return output;
  }

  /**
   * Builds `fn`'s nodes to be staged as late as their readers allow (see stages()): for a large
   * tensor made from small ones, read only by a later stage, so that the small ones cross instead.
   * One graph computes them where it always does.
   */
  late<T>(fn: () => T): T {
    return this.marking("inLate", fn);
  }

  /**
   * Builds `fn`'s nodes as one-thread nodes: on onnxruntime's CPU provider they run in a stage of
   * their own on one thread (see stages()). Scatter-adds over rows that may repeat must be built
   * here, with the nodes that make their updates, so that only the small tensors those updates are
   * made from cross between stages (onnxruntime-node copies whatever a session returns).
   */
  serially<T>(fn: () => T): T {
    return this.marking("inSerial", fn);
  }

  /** Runs `fn` with `flag` set, so that every node it builds is marked; nests. */
  private marking<T>(flag: "inLate" | "inSerial", fn: () => T): T {
    const was = this[flag];
    this[flag] = true;
    try {
      return fn();
    } finally {
      this[flag] = was;
    }
  }

  /** The element type of output `index` of an op, from its inputs' types and its attributes. */
  private outputType(opType: string, inputs: readonly string[], attrs: Record<string, AttrValue>, index: number): ElemType {
    if (opType === "Cast") return attrs.to as ElemType;
    if (I64_OUT.has(opType) || (opType === "TopK" && index === 1)) return I64;
    if (BOOL_OUT.has(opType)) return BOOL;
    const from = opType === "Where" ? inputs[1] : inputs[0];
    const type = from === undefined ? undefined : this.types.get(from);
    if (type === undefined) throw new Error(`graph ${this.graphName}: ${opType} reads ${from}, which has no known type`);
    return type;
  }

  // Sugar for the ops the step graphs use, so they read like the math.
  add = (a: string, b: string, hint?: string) => this.op("Add", [a, b], {}, hint);
  sub = (a: string, b: string, hint?: string) => this.op("Sub", [a, b], {}, hint);
  mul = (a: string, b: string, hint?: string) => this.op("Mul", [a, b], {}, hint);
  div = (a: string, b: string, hint?: string) => this.op("Div", [a, b], {}, hint);
  sqrt = (a: string, hint?: string) => this.op("Sqrt", [a], {}, hint);
  relu = (a: string, hint?: string) => this.op("Relu", [a], {}, hint);
  matmul = (a: string, b: string, hint?: string) => this.op("MatMul", [a, b], {}, hint);
  gather = (data: string, indices: string, axis: number, hint?: string) => this.op("Gather", [data, indices], { axis }, hint);
  cast = (a: string, to: ElemType, hint?: string) => this.op("Cast", [a], { to }, hint);
  greater = (a: string, b: string, hint?: string) => this.op("Greater", [a, b], {}, hint);
  where = (cond: string, a: string, b: string, hint?: string) => this.op("Where", [cond, a, b], {}, hint);
  reshape = (a: string, shape: readonly number[], hint?: string) => this.op("Reshape", [a, this.constI(shape)], {}, hint);
  unsqueeze = (a: string, axes: readonly number[], hint?: string) => this.op("Unsqueeze", [a, this.constI(axes)], {}, hint);
  exp = (a: string, hint?: string) => this.op("Exp", [a], {}, hint);

  /** a[start:end] along `axis`. */
  slice(a: string, axis: number, start: number, end: number, hint?: string): string {
    return this.op("Slice", [a, this.constI([start]), this.constI([end]), this.constI([axis])], {}, hint);
  }

  /** Entry `index` of `a` along `axis`, that axis dropped. */
  pick(a: string, axis: number, index: number, hint?: string): string {
    return this.gather(a, this.constI([index], []), axis, hint);
  }

  /** C = alpha * op(A) @ op(B) + beta * bias, with op = transpose when asked. */
  gemm(a: string, b: string, opts: { bias?: string; transA?: boolean; transB?: boolean }, hint?: string): string {
    const inputs = opts.bias ? [a, b, opts.bias] : [a, b];
    return this.op("Gemm", inputs, { transA: opts.transA ? 1 : 0, transB: opts.transB ? 1 : 0 }, hint);
  }

  /** Sum over `axes` (all axes when empty); keepdims off. */
  reduceSum(a: string, axes: readonly number[], hint?: string): string {
    return axes.length
      ? this.op("ReduceSum", [a, this.constI(axes)], { keepdims: 0 }, hint)
      : this.op("ReduceSum", [a], { keepdims: 0 }, hint);
  }

  reduceSumSquare(a: string, axes: readonly number[], hint?: string): string {
    return axes.length
      ? this.op("ReduceSumSquare", [a, this.constI(axes)], { keepdims: 0 }, hint)
      : this.op("ReduceSumSquare", [a], { keepdims: 0 }, hint);
  }

  /** Row norms with the reduced axis kept, for broadcasting back. */
  reduceL2Keep(a: string, axis: number, hint?: string): string {
    return this.op("ReduceL2", [a, this.constI([axis])], { keepdims: 1 }, hint);
  }

  /**
   * data with `updates` added at `indices` ([m, 1] rows); duplicates accumulate. onnxruntime's CPU
   * kernel adds the rows on several threads with nothing between two that hit the same row, so a
   * repeated row can lose an add: unless the caller knows the rows are `unique`, build it inside
   * serially().
   */
  scatterAdd(data: string, indices: string, updates: string, hint?: string, opts: { unique?: boolean } = {}): string {
    if (!opts.unique && !this.inSerial) {
      throw new Error(
        `graph ${this.graphName}: a scatter-add over rows that may repeat (${hint ?? "scatternd"}) must be built inside serially()`,
      );
    }
    return this.op("ScatterND", [data, indices, updates], { reduction: "add" }, hint);
  }

  /** Zeros of a fixed shape. */
  zeros(dims: readonly number[], hint = "zeros"): string {
    const value = { name: "value", type: onnx.AttributeProto.AttributeType.TENSOR, t: { dataType: F32, dims: [1], floatData: [0] } };
    const out = this.fresh(hint);
    this.types.set(out, F32);
    this.nodes.push({
      opType: "ConstantOfShape",
      name: this.fresh(`n_${hint}`),
      input: [this.constI(dims)],
      output: [out],
      attribute: [value],
    });
    return out;
  }

  /** Concatenates scalars into a 1-D vector (for small stats outputs). */
  stack(scalars: readonly string[], hint = "stack"): string {
    return this.op(
      "Concat",
      scalars.map((s) => this.reshape(s, [1])),
      { axis: 0 },
      hint,
    );
  }

  /**
   * The graph cut into stages for onnxruntime's CPU provider: the scatter-adds over rows that may
   * repeat in stages of their own, run on one thread, the rest on every thread. Undefined when the
   * graph has no such node and runs whole.
   */
  stages(): Stage[] | undefined {
    return cutStages({
      name: this.graphName,
      nodes: this.nodes,
      inputs: this.inputs,
      outputs: this.outputs,
      initializers: this.initializers,
      types: this.types,
      serial: this.serialNodes,
      late: this.lateNodes,
      opset: OPSET,
      irVersion: IR_VERSION,
    });
  }

  /** The serialized model. */
  build(): Uint8Array {
    const model = onnx.ModelProto.create({
      irVersion: IR_VERSION,
      producerName: "saeflow",
      opsetImport: [{ domain: "", version: OPSET }],
      graph: { name: this.graphName, node: this.nodes, input: this.inputs, output: this.outputs, initializer: this.initializers },
    });
    return onnx.ModelProto.encode(model).finish();
  }
}
