import {
  type AttributeProto,
  AttributeType,
  DataType,
  type GraphProto,
  type NodeProto,
  type TensorProto,
  type ValueInfoProto,
} from "../../services/producer/model/onnx.js";

/**
 * A small ONNX graph builder that names nodes the way torch.onnx does: `<scope>/<Op>`, then
 * `<scope>/<Op>_1`, ... with outputs `<node>_output_0`, so graphs built here carry the tensor
 * names of an optimum export and the hook mapping meets the same names on both.
 */

const bytes = (a: Float32Array | BigInt64Array): Uint8Array => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

export const floatTensor = (dims: readonly number[], data: Float32Array, name?: string): TensorProto => ({
  name,
  dims: [...dims],
  dataType: DataType.FLOAT,
  rawData: bytes(data),
});

export const int64Tensor = (dims: readonly number[], values: readonly number[]): TensorProto => ({
  dims: [...dims],
  dataType: DataType.INT64,
  rawData: bytes(BigInt64Array.from(values, (v) => BigInt(v))),
});

export const attr = {
  int: (name: string, i: number): AttributeProto => ({ name, type: AttributeType.INT, i }),
  float: (name: string, f: number): AttributeProto => ({ name, type: AttributeType.FLOAT, f }),
  ints: (name: string, ints: readonly number[]): AttributeProto => ({ name, type: AttributeType.INTS, ints: [...ints] }),
  tensor: (name: string, t: TensorProto): AttributeProto => ({ name, type: AttributeType.TENSOR, t }),
};

/** A graph input or output with symbolic (string) or fixed (number) dimensions. */
export function valueInfo(name: string, elemType: number, dims: ReadonlyArray<string | number>): ValueInfoProto {
  const dim = dims.map((d) => (typeof d === "string" ? { dimParam: d } : { dimValue: d }));
  return { name, type: { tensorType: { elemType, shape: { dim } } } };
}

export class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  private readonly counts = new Map<string, number>();

  /** Adds a node and returns its output; `output` names it explicitly (e.g. the graph's "logits"). */
  op(scope: string, opType: string, inputs: readonly string[], attributes: AttributeProto[] = [], output?: string): string {
    const base = `${scope}/${opType}`;
    const n = this.counts.get(base) ?? 0;
    this.counts.set(base, n + 1);
    const name = n === 0 ? base : `${base}_${n}`;
    const out = output ?? `${name}_output_0`;
    this.nodes.push({ name, opType, input: [...inputs], output: [out], attribute: attributes });
    return out;
  }

  /** Adds a node with `count` outputs (Split), named `<node>_output_<i>` as torch.onnx names them. */
  ops(scope: string, opType: string, inputs: readonly string[], count: number, attributes: AttributeProto[] = []): string[] {
    const first = this.op(scope, opType, inputs, attributes);
    const node = this.nodes[this.nodes.length - 1]!;
    const base = first.replace(/_output_0$/, "");
    node.output = Array.from({ length: count }, (_, i) => `${base}_output_${i}`);
    return node.output;
  }

  /** A Constant node, as torch.onnx emits for literals and shapes. */
  constant(scope: string, value: TensorProto): string {
    return this.op(scope, "Constant", [], [attr.tensor("value", value)]);
  }

  ints(scope: string, values: readonly number[]): string {
    return this.constant(scope, int64Tensor([values.length], values));
  }

  scalar(scope: string, value: number): string {
    return this.constant(scope, floatTensor([], Float32Array.of(value)));
  }

  initializer(name: string, dims: readonly number[], data: Float32Array): string {
    this.initializers.push(floatTensor(dims, data, name));
    return name;
  }

  graph(name: string, input: ValueInfoProto[], output: ValueInfoProto[]): GraphProto {
    return { name, node: this.nodes, initializer: this.initializers, input, output };
  }
}
