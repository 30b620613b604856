import { dirname } from "node:path";
import * as ort from "onnxruntime-node";
import { decodeFloats } from "../../services/common/tensor-codec.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { resolveHooks } from "../../services/producer/model/hooks.js";
import { indexGraph, int, loadModel, type ModelProto } from "../../services/producer/model/onnx.js";
import { sessionFor } from "../../services/producer/model/session.js";
import { mulberry32 } from "./prng.js";

/**
 * Checks of rewritten models against the original, run in onnxruntime on a sample batch: random
 * tokens, one row left-padded so the attention mask matters.
 */

/** Ops that pass input_ids on unchanged but for shape or type, as GPT-2's view(-1, seq) does before the embedding. */
const PASS_THROUGH = new Set(["Reshape", "Cast", "Identity", "Unsqueeze", "Squeeze", "Flatten"]);

/** The vocabulary size, read from the shape of the embedding table that input_ids index. */
export function vocabSize(model: ModelProto): number {
  const graph = model.graph ?? {};
  const index = indexGraph(graph);
  const stack = ["input_ids"];
  while (stack.length) {
    const ids = stack.pop()!;
    for (const node of (index.consumers.get(ids) ?? []).map((i) => index.nodes[i]!)) {
      const table = node.opType === "Gather" && node.input?.[1] === ids ? index.initializers.get(node.input[0] ?? "") : undefined;
      if (table?.dims?.length) return int(table.dims[0]);
      if (PASS_THROUGH.has(node.opType ?? "") && node.input?.[0] === ids) stack.push(node.output![0]!);
    }
  }
  throw new Error("cannot find the embedding table that input_ids index");
}

/** Feeds for the model's inputs (input_ids, attention_mask, position_ids) for `batch` rows of `seq` tokens. */
export function sampleFeeds(
  inputNames: readonly string[],
  vocab: number,
  batch: number,
  seq: number,
  seed = 1,
): Record<string, ort.Tensor> {
  const uniform = mulberry32(seed);
  const ids = BigInt64Array.from({ length: batch * seq }, () => BigInt(Math.floor(uniform() * vocab)));
  // Row 1 (if any) is left-padded by a quarter of its length, positions counting from its first token.
  const padOf = (row: number) => (row === 1 ? Math.floor(seq / 4) : 0);
  const mask = BigInt64Array.from({ length: batch * seq }, (_, i) => (i % seq < padOf(Math.floor(i / seq)) ? 0n : 1n));
  const positions = BigInt64Array.from({ length: batch * seq }, (_, i) => BigInt(Math.max(0, (i % seq) - padOf(Math.floor(i / seq)))));
  const data: Record<string, BigInt64Array> = { input_ids: ids, attention_mask: mask, position_ids: positions };
  return Object.fromEntries(
    inputNames.map((name) => {
      const values = data[name];
      if (!values) throw new Error(`no sample data for model input "${name}"`);
      return [name, new ort.Tensor("int64", values, [batch, seq])];
    }),
  );
}

export function maxDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} vs ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i]! - b[i]!));
  return max;
}

/** A float tensor's values as float32 (fp16 exports return raw 16-bit words). */
function floats(t: ort.Tensor): Float32Array {
  if (t.type === "float32") return t.data as Float32Array;
  if (t.type === "float16") return decodeFloats(t.data as Uint16Array, DType.FP16);
  throw new Error(`cannot compare ${t.type} tensors`);
}

function maxAbsDiff(a: ort.Tensor, b: ort.Tensor): number {
  if (a.dims.join() !== b.dims.join()) throw new Error(`shapes differ: [${a.dims.join(", ")}] vs [${b.dims.join(", ")}]`);
  return maxDiff(floats(a), floats(b));
}

/** The original model with `tensors` as extra graph outputs, to read them in one run. */
function withOutputs(model: ModelProto, tensors: readonly string[]): ModelProto {
  const graph = model.graph ?? {};
  const have = new Set((graph.output ?? []).map((o) => o.name));
  const extra = [...new Set(tensors)].filter((t) => !have.has(t)).map((name) => ({ name }));
  return { ...model, graph: { ...graph, output: [...(graph.output ?? []), ...extra] } };
}

export interface CheckOptions {
  batch?: number;
  seq?: number;
}

/** Max abs difference per hook between the truncated model's outputs and the original's tensors. */
export async function checkTruncation(
  modelPath: string,
  truncated: ModelProto,
  hooks: readonly string[],
  options: CheckOptions = {},
): Promise<Record<string, number>> {
  const original = loadModel(modelPath);
  const resolved = resolveHooks(original.graph ?? {}, hooks);
  const dir = dirname(modelPath);
  const full = await sessionFor(
    withOutputs(
      original,
      resolved.map((h) => h.tensor),
    ),
    dir,
  );
  const cut = await sessionFor(truncated, dir);
  try {
    const feeds = sampleFeeds(full.inputNames, vocabSize(original), options.batch ?? 2, options.seq ?? 16);
    const want = await full.run(feeds);
    const got = await cut.run(feeds);
    return Object.fromEntries(resolved.map((h) => [h.name, maxAbsDiff(want[h.tensor]!, got[h.name]!)]));
  } finally {
    await Promise.all([full.release(), cut.release()]);
  }
}

/**
 * Max abs difference between the original logits and those of truncated → suffix, where the
 * suffix takes `hooks` (its cut point first) as inputs.
 */
export async function checkSuffix(modelPath: string, prefix: ModelProto, suffix: ModelProto, options: CheckOptions = {}): Promise<number> {
  const original = loadModel(modelPath);
  const dir = dirname(modelPath);
  const [full, head, tail] = await Promise.all([sessionFor(original, dir), sessionFor(prefix, dir), sessionFor(suffix, dir)]);
  try {
    const feeds = sampleFeeds(full.inputNames, vocabSize(original), options.batch ?? 2, options.seq ?? 16);
    const want = await full.run(feeds);
    const cut = await head.run(feeds);
    const got = await tail.run({ ...feeds, ...cut });
    return maxAbsDiff(want.logits!, got.logits!);
  } finally {
    await Promise.all([full.release(), head.release(), tail.release()]);
  }
}
