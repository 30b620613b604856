import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { fp16ToFp32, fp32ToBf16, fp32ToFp16 } from "../../services/common/tensor-codec.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { gatherRows, keptSpans } from "../../services/producer/convert.js";

describe("convert", () => {
  const D = 3;
  const keep = Uint8Array.from([0, 1, 1, 0, 1, 0]);
  const values = Float32Array.from({ length: keep.length * D }, (_, i) => (i - 7) / 3);
  const rowsOf = (src: ArrayLike<number>) => [1, 2, 4].flatMap((p) => Array.from({ length: D }, (_, k) => src[p * D + k]!));

  it("groups kept positions into runs", () => {
    assert.deepEqual(keptSpans(keep), [
      [1, 3],
      [4, 5],
    ]);
    assert.deepEqual(keptSpans(new Uint8Array(4)), []);
  });

  it("gathers kept rows of an fp32 output into each wire dtype", () => {
    const spans = keptSpans(keep);
    const out = { data: values, type: "float32" as const };
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.FP32)], rowsOf(values));
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.FP16)], rowsOf(values).map(fp32ToFp16));
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.BF16)], rowsOf(values).map(fp32ToBf16));
  });

  it("gathers kept rows of an fp16 output into each wire dtype", () => {
    const spans = keptSpans(keep);
    const words = Uint16Array.from(values, fp32ToFp16);
    const out = { data: words, type: "float16" as const };
    const asF32 = rowsOf(words).map(fp16ToFp32);
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.FP16)], rowsOf(words));
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.FP32)], [...Float32Array.from(asF32)]);
    assert.deepEqual([...gatherRows(out, spans, 3, D, DType.BF16)], asF32.map(fp32ToBf16));
  });
});
