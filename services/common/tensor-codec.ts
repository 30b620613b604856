import { create } from "@bufbuild/protobuf";
import type { DTypeName } from "./config/sections/dtype.js";
import { FieldError } from "./errors.js";
import { DType, type Tensor, TensorSchema } from "../gen/saeflow/v1/tensor_pb.js";

/**
 * The one tensor codec. Tensors travel as raw little-endian bytes; this module maps between wire
 * Tensors and typed arrays without copying where alignment allows, checks a received Tensor, and
 * converts between fp32, fp16 and bf16.
 */

export const DTYPE_BYTES: Record<DType, number> = {
  [DType.UNSPECIFIED]: 0,
  [DType.FP32]: 4,
  [DType.FP16]: 2,
  [DType.BF16]: 2,
};

const BY_NAME: Record<DTypeName, DType> = { fp32: DType.FP32, fp16: DType.FP16, bf16: DType.BF16 };
export const dtypeFromName = (name: DTypeName): DType => BY_NAME[name];
export function dtypeName(dtype: DType): DTypeName {
  const name = (Object.keys(BY_NAME) as DTypeName[]).find((k) => BY_NAME[k] === dtype);
  if (!name) throw new FieldError("dtype", `unsupported dtype ${dtype}`);
  return name;
}

/** fp32 as Float32Array; fp16 and bf16 as their raw 16-bit words. */
export type HostArray = Float32Array | Uint16Array;

/** Wraps host memory as a wire Tensor; the bytes are a view, not a copy. */
export function toTensor(array: HostArray, dtype: DType, shape: readonly number[]): Tensor {
  const expected = shape.reduce((a, b) => a * b, 1);
  if (array.length !== expected) throw new RangeError(`toTensor: ${array.length} elements for shape [${shape.join(", ")}]`);
  if (array instanceof Float32Array !== (dtype === DType.FP32)) throw new TypeError(`toTensor: array type does not fit dtype ${dtype}`);
  return create(TensorSchema, { dtype, shape: [...shape], data: new Uint8Array(array.buffer, array.byteOffset, array.byteLength) });
}

/** Most dimensions a tensor without an expected shape may have. */
const MAX_RANK = 8;

/** A shape for an error message, e.g. "[4096, 64]". */
const shapeText = (shape: readonly number[]) => `[${shape.join(", ")}]`;

export interface TensorExpectation {
  dtype?: DType;
  /** Expected size of each dimension; undefined entries are free. */
  shape?: ReadonlyArray<number | undefined>;
  /** Largest payload accepted. */
  maxBytes?: number;
}

/**
 * Checks a received Tensor and returns its element count. Errors are FieldErrors naming `field`
 * (e.g. "chunk.activations.shape"), answered as INVALID_ARGUMENT.
 */
export function checkTensor(tensor: Tensor | undefined, field: string, expect: TensorExpectation = {}): number {
  if (!tensor) throw new FieldError(field, "missing");
  const size = DTYPE_BYTES[tensor.dtype];
  if (!size) throw new FieldError(`${field}.dtype`, `unsupported dtype ${tensor.dtype}; expected FP32, FP16 or BF16`);
  if (expect.dtype !== undefined && tensor.dtype !== expect.dtype) {
    throw new FieldError(`${field}.dtype`, `got ${DType[tensor.dtype]}, expected ${DType[expect.dtype]}`);
  }
  const { shape } = tensor;
  if (shape.length === 0) throw new FieldError(`${field}.shape`, "empty shape");
  if (expect.shape) {
    if (shape.length !== expect.shape.length)
      throw new FieldError(`${field}.shape`, `rank ${shape.length}, expected ${expect.shape.length}`);
    expect.shape.forEach((want, i) => {
      if (want !== undefined && shape[i] !== want)
        throw new FieldError(`${field}.shape`, `dimension ${i} is ${shape[i]}, expected ${want}`);
    });
  } else if (shape.length > MAX_RANK) {
    throw new FieldError(`${field}.shape`, `rank ${shape.length}; at most ${MAX_RANK} dimensions`);
  }
  // A product past 2^53 is no longer exact: compare it with the payload only while it is.
  const elements = shape.reduce((a, b) => a * b, 1);
  if (!Number.isSafeInteger(elements * size)) {
    throw new FieldError(
      `${field}.shape`,
      `${shapeText(shape)} x ${size} bytes is past 2^53 bytes; the payload holds ${tensor.data.byteLength}`,
    );
  }
  if (elements * size !== tensor.data.byteLength) {
    throw new FieldError(
      `${field}.data`,
      `${tensor.data.byteLength} bytes, but shape ${shapeText(shape)} x ${size} bytes = ${elements * size}`,
    );
  }
  if (expect.maxBytes !== undefined && tensor.data.byteLength > expect.maxBytes) {
    throw new FieldError(`${field}.data`, `${tensor.data.byteLength} bytes exceeds the limit of ${expect.maxBytes}`);
  }
  return elements;
}

/**
 * The payload as a typed array. A view when the bytes are aligned for the element type, else one
 * copy (a received payload sits where its message put it in grpc-js' buffer: aligned when the sender
 * filled the message's align field, as grpc/wire.ts does).
 */
export function fromTensor(tensor: Tensor): HostArray {
  const { data } = tensor;
  const fp32 = tensor.dtype === DType.FP32;
  const width = fp32 ? 4 : 2;
  const bytes = data.byteOffset % width === 0 ? data : new Uint8Array(data);
  return fp32
    ? new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4)
    : new Uint16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 2);
}

// Conversions. fp16 follows IEEE 754 round-to-nearest-even; bf16 rounds to nearest even as well.
const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function fp32ToBf16(value: number): number {
  f32[0] = value;
  const bits = u32[0]!;
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return (bits >>> 16) | 0x40; // keep NaN a NaN
  return ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 16) & 0xffff;
}

export function bf16ToFp32(word: number): number {
  u32[0] = word << 16;
  return f32[0]!;
}

export function fp32ToFp16(value: number): number {
  f32[0] = value;
  const x = u32[0]!;
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  let mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  let e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    const half = 1 << (shift - 1);
    let r = mant >>> shift;
    const rest = mant & ((1 << shift) - 1);
    if (rest > half || (rest === half && r & 1)) r += 1;
    return sign | r;
  }
  let r = mant >>> 13;
  const rest = mant & 0x1fff;
  if (rest > 0x1000 || (rest === 0x1000 && r & 1)) {
    r += 1;
    if (r === 0x400) {
      r = 0;
      e += 1;
      if (e >= 0x1f) return sign | 0x7c00;
    }
  }
  return sign | (e << 10) | r;
}

export function fp16ToFp32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** Converts fp32 values into the wire dtype, into `out` when given. */
export function encodeFloats(values: Float32Array, dtype: DType, out?: HostArray): HostArray {
  if (dtype === DType.FP32) {
    if (!out) return values;
    (out as Float32Array).set(values);
    return out;
  }
  const words = (out as Uint16Array | undefined) ?? new Uint16Array(values.length);
  const convert = dtype === DType.BF16 ? fp32ToBf16 : fp32ToFp16;
  for (let i = 0; i < values.length; i++) words[i] = convert(values[i]!);
  return words;
}

/** Converts wire data to fp32, into `out` when given. */
export function decodeFloats(data: HostArray, dtype: DType, out?: Float32Array): Float32Array {
  if (dtype === DType.FP32) {
    if (!out) return data as Float32Array;
    out.set(data);
    return out;
  }
  const values = out ?? new Float32Array(data.length);
  const convert = dtype === DType.BF16 ? bf16ToFp32 : fp16ToFp32;
  for (let i = 0; i < data.length; i++) values[i] = convert(data[i]!);
  return values;
}

/**
 * Index of the first NaN or Inf element in raw little-endian tensor bytes, or -1. Bytes at any
 * offset (a tensor inside a received message) are checked where they lie. Every pushed row is
 * checked, so the common answer (none) comes from a pass over word views where the bytes are 4-byte
 * aligned, as a saeflow producer's pushes land (their `align` filler): 1.4 to 1.9 times the speed of
 * the byte-wise scan, which finds the index, and checks bytes that lie unaligned.
 */
export function firstNonFinite(bytes: Uint8Array, dtype: DType): number {
  if (bytes.byteOffset % 4 !== 0) return scanNonFinite(bytes, dtype, 0);
  const words = bytes.length >> 2;
  if (dtype === DType.FP32)
    return allFinite32(new Float32Array(bytes.buffer, bytes.byteOffset, words)) ? -1 : scanNonFinite(bytes, dtype, 0);
  const pairs = new Int32Array(bytes.buffer, bytes.byteOffset, words);
  const flagged = dtype === DType.BF16 ? anyBf16ExponentAllOnes(pairs) : anyFp16ExponentAllOnes(pairs);
  // The odd element a pair view leaves out, if any, is checked by the index search itself.
  return scanNonFinite(bytes, dtype, flagged ? 0 : words * 2);
}

// Two 16-bit values to an int32 word, shifted right by one so that the sums stay small integers: a
// masked exponent of all ones plus its lowest bit is exactly 0x4000 in its half and never carries
// into the other. The constants are written out in each loop, where the compiler folds them.

function anyBf16ExponentAllOnes(pairs: Int32Array): boolean {
  let acc = 0;
  for (let i = 0; i < pairs.length; i++) acc |= ((pairs[i]! >>> 1) & 0x3fc03fc0) + 0x00400040;
  return (acc & 0x40004000) !== 0;
}

function anyFp16ExponentAllOnes(pairs: Int32Array): boolean {
  let acc = 0;
  for (let i = 0; i < pairs.length; i++) acc |= ((pairs[i]! >>> 1) & 0x3e003e00) + 0x02000200;
  return (acc & 0x40004000) !== 0;
}

/** True when every value is finite: x * 0 is ±0 for a finite x and NaN otherwise, and a NaN stays in the sums. */
function allFinite32(values: Float32Array): boolean {
  let s0 = 0;
  let s1 = 0;
  let s2 = 0;
  let s3 = 0;
  const n = values.length;
  let i = 0;
  for (; i + 3 < n; i += 4) {
    s0 += values[i]! * 0;
    s1 += values[i + 1]! * 0;
    s2 += values[i + 2]! * 0;
    s3 += values[i + 3]! * 0;
  }
  for (; i < n; i++) s0 += values[i]! * 0;
  return s0 + s1 + s2 + s3 === 0;
}

/** Index of the first NaN or Inf element at or after element `from`, reading the exponent bits byte by byte; -1 if none. */
function scanNonFinite(bytes: Uint8Array, dtype: DType, from: number): number {
  if (dtype === DType.FP32) {
    // Exponent: the low 7 bits of byte 3 and the top bit of byte 2 all ones.
    for (let i = from * 4 + 3, n = bytes.length; i < n; i += 4) {
      if ((bytes[i]! & 0x7f) === 0x7f && bytes[i - 1]! & 0x80) return (i - 3) >> 2;
    }
    return -1;
  }
  // bf16: exponent = low 7 bits of the high byte and top bit of the low byte; fp16: bits 2-6 of the high byte.
  const bf16 = dtype === DType.BF16;
  for (let i = from * 2 + 1, n = bytes.length; i < n; i += 2) {
    const hi = bytes[i]!;
    if (bf16 ? (hi & 0x7f) === 0x7f && bytes[i - 1]! & 0x80 : (hi & 0x7c) === 0x7c) return (i - 1) >> 1;
  }
  return -1;
}
