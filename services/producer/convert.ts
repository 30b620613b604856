import { wireBuffer } from "../common/grpc/wire.js";
import { decodeFloats, encodeFloats, type HostArray } from "../common/tensor-codec.js";
import { DType } from "../gen/saeflow/v1/tensor_pb.js";
import type { HookOutput } from "./session.js";

/** Runs of consecutive positions to send, as [start, end) pairs over the flattened [batch, length]. */
export type Spans = Array<[number, number]>;

/** Groups the kept positions into runs, so rows are copied a run at a time. */
export function keptSpans(keep: Uint8Array): Spans {
  const spans: Spans = [];
  for (let p = 0; p < keep.length; p++) {
    if (!keep[p]) continue;
    const start = p;
    while (p + 1 < keep.length && keep[p + 1]) p++;
    spans.push([start, p + 1]);
  }
  return spans;
}

/** Bytes of a chunk's other fields per row (token, context and document ids as varints), kept in front of its rows. */
const ID_BYTES_PER_ROW = 32;

/**
 * The kept rows of a hook tensor in the wire dtype: one pass that gathers and converts, into one
 * freshly allocated array that the chunk then carries, and gRPC sends, without another copy.
 */
export function gatherRows(output: HookOutput, spans: Spans, rows: number, dModel: number, dtype: DType): HostArray {
  const width = dtype === DType.FP32 ? 4 : 2;
  const memory = wireBuffer(rows * dModel * width, 4096 + rows * ID_BYTES_PER_ROW);
  const out: HostArray =
    dtype === DType.FP32
      ? new Float32Array(memory.buffer, memory.byteOffset, rows * dModel)
      : new Uint16Array(memory.buffer, memory.byteOffset, rows * dModel);
  const scratch =
    output.type === "float16" && dtype === DType.BF16 ? new Float32Array(dModel * Math.max(0, ...spans.map(([a, b]) => b - a))) : undefined;
  let row = 0;
  for (const [start, end] of spans) {
    const n = (end - start) * dModel;
    const src = output.data.subarray(start * dModel, end * dModel);
    const dst = out.subarray(row * dModel, row * dModel + n);
    if (output.type === "float32") encodeFloats(src as Float32Array, dtype, dst);
    else if (dtype === DType.FP16) dst.set(src);
    else if (dtype === DType.FP32) decodeFloats(src as Uint16Array, DType.FP16, dst as Float32Array);
    else encodeFloats(decodeFloats(src as Uint16Array, DType.FP16, scratch!.subarray(0, n)), dtype, dst);
    row += end - start;
  }
  return out;
}
