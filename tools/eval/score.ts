import {
  AttributeType,
  DataType,
  int,
  type ModelProto,
  type NodeProto,
  type TensorProto,
  tensorValueInfo,
} from "../../services/producer/model/onnx.js";

/**
 * Next-token scores of a model's logits: cross-entropy and KL divergence per position. The wide
 * reduction (log-sum-exp over a 128k vocabulary, per position and run) is done by onnxruntime in
 * the model itself, which is several times faster than a JS loop; what is left per position is a
 * gather (cross-entropy) and one pass over the vocabulary per SAE (KL).
 */

/** Name of the log-sum-exp output withLogSumExp adds. */
export const LSE = "saeflow_logsumexp";

/**
 * `model` with a second output beside "logits": log sum_v exp(logits_v) over the last axis, in
 * float32 whatever the logits' type (an fp16 sum over 128k terms would lose the loss). onnxruntime's
 * ReduceLogSumExp subtracts the max first, so logits in the thousands do not overflow (tested).
 * Its axes are an attribute before opset 18 and an input from 18 on.
 */
export function withLogSumExp(model: ModelProto): ModelProto {
  const graph = model.graph ?? {};
  const opset = int(model.opsetImport?.find((o) => !o.domain || o.domain === "ai.onnx")?.version);
  const float = `${LSE}/float`;
  const axes = `${LSE}/axes`;
  const axesInput = opset >= 18;
  const nodes: NodeProto[] = [
    {
      opType: "Cast",
      name: "/saeflow/Cast",
      input: ["logits"],
      output: [float],
      attribute: [{ name: "to", type: AttributeType.INT, i: DataType.FLOAT }],
    },
    {
      opType: "ReduceLogSumExp",
      name: "/saeflow/ReduceLogSumExp",
      input: axesInput ? [float, axes] : [float],
      output: [LSE],
      attribute: [
        { name: "keepdims", type: AttributeType.INT, i: 0 },
        ...(axesInput ? [] : [{ name: "axes", type: AttributeType.INTS, ints: [-1] }]),
      ],
    },
  ];
  const axesTensor: TensorProto = {
    name: axes,
    dims: [1],
    dataType: DataType.INT64,
    rawData: new Uint8Array(BigInt64Array.of(-1n).buffer),
  };
  return {
    ...model,
    graph: {
      ...graph,
      node: [...(graph.node ?? []), ...nodes],
      initializer: [...(graph.initializer ?? []), ...(axesInput ? [axesTensor] : [])],
      output: [...(graph.output ?? []), tensorValueInfo(LSE, DataType.FLOAT)],
    },
  };
}

/** One run's logits [s, V] (float32) and each position's log-sum-exp [s]. */
export interface Scored {
  logits: Float32Array;
  lse: Float32Array;
}

/** Sum over `positions` p of -log softmax(logits_p)[ids[p + 1]]. */
export function crossEntropy({ logits, lse }: Scored, ids: readonly number[], positions: readonly number[], V: number): number {
  let sum = 0;
  for (const p of positions) sum += lse[p]! - logits[p * V + ids[p + 1]!]!;
  return sum;
}

/**
 * KL(softmax(a_p) || softmax(b_p)) at position p, from the identity
 * sum_v P_v (log P_v - log Q_v) = sum_v P_v (a_v - b_v) - lse(a) + lse(b): one exp per logit,
 * and exactly 0 when the logits are equal.
 */
export function klAt(original: Scored, other: Scored, p: number, V: number): number {
  const a = original.logits;
  const b = other.logits;
  const lseA = original.lse[p]!;
  let sum = 0;
  for (let v = p * V, end = (p + 1) * V; v < end; v++) sum += Math.exp(a[v]! - lseA) * (a[v]! - b[v]!);
  return sum - lseA + other.lse[p]!;
}
