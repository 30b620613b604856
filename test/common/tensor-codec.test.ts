import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { FieldError } from "../../services/common/errors.js";
import {
  bf16ToFp32,
  checkTensor,
  decodeFloats,
  encodeFloats,
  fp16ToFp32,
  fp32ToBf16,
  fp32ToFp16,
  fromTensor,
  firstNonFinite,
  toTensor,
} from "../../services/common/tensor-codec.js";
import { DType, TensorSchema } from "../../services/gen/saeflow/v1/tensor_pb.js";

const refuses = (fn: () => unknown, field: string) =>
  assert.throws(fn, (err: unknown) => err instanceof FieldError && err.field === field && err.message.startsWith(`${field}: `));

describe("tensor codec", () => {
  it("wraps host memory without copying and reads it back as a view", () => {
    const values = Float32Array.from({ length: 12 }, (_, i) => i / 3);
    const t = toTensor(values, DType.FP32, [3, 4]);
    assert.equal(t.data.buffer, values.buffer);
    assert.equal(checkTensor(t, "x", { dtype: DType.FP32, shape: [undefined, 4] }), 12);
    const back = fromTensor(t);
    assert.equal(back.buffer, values.buffer);
    assert.deepEqual([...back], [...values]);
  });

  it("copies only when received bytes are misaligned for the element type", () => {
    const raw = new Uint8Array(4 * 4 + 1);
    new Float32Array(raw.buffer, 0, 4).set([1, 2, 3, 4]);
    raw.copyWithin(1, 0, 16);
    const t = create(TensorSchema, { dtype: DType.FP32, shape: [4], data: raw.subarray(1) });
    assert.deepEqual([...fromTensor(t)], [1, 2, 3, 4]);
  });

  it("refuses a wrong dtype, a byte length that does not fit the shape, and oversize payloads, naming the field", () => {
    const t = toTensor(new Float32Array(8), DType.FP32, [2, 4]);
    refuses(() => checkTensor(t, "chunk.activations", { dtype: DType.BF16 }), "chunk.activations.dtype");
    refuses(() => checkTensor(create(TensorSchema, { dtype: DType.UNSPECIFIED, shape: [1], data: new Uint8Array(4) }), "t"), "t.dtype");
    refuses(() => checkTensor(create(TensorSchema, { dtype: DType.FP16, shape: [2, 4], data: new Uint8Array(15) }), "t"), "t.data");
    refuses(() => checkTensor(t, "t", { shape: [undefined, 8] }), "t.shape");
    refuses(() => checkTensor(t, "t", { shape: [2] }), "t.shape");
    refuses(() => checkTensor(t, "t", { maxBytes: 16 }), "t.data");
    refuses(() => checkTensor(undefined, "chunk.activations"), "chunk.activations");
  });

  it("converts fp16 exactly on representable values and rounds to nearest even", () => {
    for (const v of [0, -0, 1, -2.5, 65504, 6.103515625e-5, 5.960464477539063e-8, 0.333251953125]) {
      assert.equal(fp16ToFp32(fp32ToFp16(v)), v);
    }
    assert.equal(fp16ToFp32(fp32ToFp16(1 + 2 ** -11)), 1); // tie → even
    assert.equal(fp16ToFp32(fp32ToFp16(1 + 3 * 2 ** -11)), 1 + 2 ** -9);
    assert.equal(fp16ToFp32(fp32ToFp16(1e6)), Infinity);
    assert.ok(Number.isNaN(fp16ToFp32(fp32ToFp16(NaN))));
  });

  it("converts bf16 with round-to-nearest-even and keeps NaN", () => {
    for (const v of [0, 1, -3, 1.5, 2 ** 100, -(2 ** -100)]) assert.equal(bf16ToFp32(fp32ToBf16(v)), v);
    assert.equal(bf16ToFp32(fp32ToBf16(1 + 2 ** -8)), 1); // tie → even
    assert.equal(bf16ToFp32(fp32ToBf16(1 + 3 * 2 ** -8)), 1 + 2 ** -6);
    assert.ok(Number.isNaN(bf16ToFp32(fp32ToBf16(NaN))));
  });

  it("round-trips arrays through each wire dtype within its precision", () => {
    const values = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i) * 10);
    for (const [dtype, tol] of [
      [DType.FP32, 0],
      [DType.FP16, 10 * 2 ** -11],
      [DType.BF16, 10 * 2 ** -8],
    ] as const) {
      const back = decodeFloats(encodeFloats(values, dtype), dtype);
      for (let i = 0; i < values.length; i++) assert.ok(Math.abs(back[i]! - values[i]!) <= tol, `${DType[dtype]} at ${i}`);
    }
  });

  it("finds the first NaN or Inf in raw bytes at any offset, in every dtype", () => {
    for (const dtype of [DType.FP32, DType.FP16, DType.BF16]) {
      for (const [bad, at] of [
        [Infinity, 2],
        [-Infinity, 5],
        [NaN, 0],
        [undefined, -1],
      ] as const) {
        const values = Float32Array.from([1, -2, 3.5, 65000, -0, 1e-30]);
        if (bad !== undefined) values[at] = bad;
        const words = encodeFloats(values, dtype);
        const bytes = new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
        // Shifted by one byte, as a tensor inside a received message may lie.
        const shifted = new Uint8Array(bytes.length + 1);
        shifted.set(bytes, 1);
        for (const view of [bytes, shifted.subarray(1)]) assert.equal(firstNonFinite(view, dtype), at, `${DType[dtype]} ${bad}`);
      }
    }
  });

  it("finds the first NaN or Inf wherever it lies: each position of short and odd lengths, at every byte offset", () => {
    // The largest finite values and subnormals must pass; lengths cover the word passes' tails.
    for (const [dtype, largest, smallest] of [
      [DType.FP32, 3.4e38, -1e-45],
      [DType.FP16, 65504, -6e-8],
      [DType.BF16, 3.3e38, -1e-40],
    ] as const) {
      for (const length of [1, 2, 3, 5, 8, 9, 33]) {
        for (let at = -1; at < length; at++) {
          for (const bad of at < 0 ? [undefined] : [NaN, Infinity, -Infinity]) {
            const values = Float32Array.from({ length }, (_, i) => [largest, smallest, 0][i % 3]! * (i % 2 ? -1 : 1));
            if (bad !== undefined) values[at] = bad;
            if (bad !== undefined && at + 2 < length) values[at + 2] = NaN; // only the first counts
            const words = encodeFloats(values, dtype);
            const bytes = new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
            for (const offset of [0, 1, 2, 4]) {
              const room = new Uint8Array(bytes.length + 8);
              room.set(bytes, offset);
              const view = room.subarray(offset, offset + bytes.length);
              assert.equal(firstNonFinite(view, dtype), at, `${DType[dtype]} length ${length}, ${bad} at ${at}, offset ${offset}`);
            }
          }
        }
      }
    }
  });
});
