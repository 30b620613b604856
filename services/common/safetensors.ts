import { closeSync, fsyncSync, openSync, readFileSync, renameSync, rmSync, writeSync } from "node:fs";
import { dirname } from "node:path";

/**
 * The safetensors format (what SAELens and Hugging Face read): an 8-byte little-endian header
 * length, a JSON header mapping each name to {dtype, shape, data_offsets} plus an optional
 * "__metadata__" string map, then the raw little-endian tensor bytes, contiguous, offsets counted
 * from the end of the header. npm holds no maintained writer, so this is the one reader and writer.
 */

export type SafeDType = "F64" | "F32" | "F16" | "BF16" | "I64" | "I32" | "U8";
export type SafeArray = Float64Array | Float32Array | Uint16Array | BigInt64Array | Int32Array | Uint8Array;

export interface SafeTensor {
  dtype: SafeDType;
  shape: number[];
  /** Row-major elements; F16 and BF16 as raw 16-bit words. */
  data: SafeArray;
}

export interface SafeFile {
  tensors: Record<string, SafeTensor>;
  metadata: Record<string, string>;
}

const WIDTH: Record<SafeDType, number> = { F64: 8, F32: 4, F16: 2, BF16: 2, I64: 8, I32: 4, U8: 1 };
const ARRAY: Record<SafeDType, new (buffer: ArrayBufferLike, byteOffset: number, length: number) => SafeArray> = {
  F64: Float64Array,
  F32: Float32Array,
  F16: Uint16Array,
  BF16: Uint16Array,
  I64: BigInt64Array,
  I32: Int32Array,
  U8: Uint8Array,
};

interface HeaderEntry {
  dtype: SafeDType;
  shape: number[];
  data_offsets: [number, number];
}

const bytesOf = (a: SafeArray) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

/** The header and the byte chunks that follow it, in file order. */
export function encodeSafetensors(tensors: Record<string, SafeTensor>, metadata: Record<string, string> = {}): Uint8Array[] {
  const header: Record<string, HeaderEntry | Record<string, string>> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  const chunks: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    if (name === "__metadata__") throw new Error("safetensors: __metadata__ is not a tensor name");
    const elements = t.shape.reduce((a, b) => a * b, 1);
    if (elements !== t.data.length) throw new Error(`safetensors: ${name} has ${t.data.length} elements for shape [${t.shape.join(", ")}]`);
    if (t.data.BYTES_PER_ELEMENT !== WIDTH[t.dtype]) throw new Error(`safetensors: ${name} array does not fit dtype ${t.dtype}`);
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    chunks.push(bytesOf(t.data));
    offset += t.data.byteLength;
  }
  // Pad with spaces so the data starts 8-byte aligned, as the reference implementation does.
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((8 + Buffer.byteLength(json)) % 8)) % 8);
  const headerBytes = Buffer.from(json, "utf8");
  const prefix = Buffer.alloc(8 + headerBytes.length);
  prefix.writeBigUInt64LE(BigInt(headerBytes.length), 0);
  headerBytes.copy(prefix, 8);
  return [prefix, ...chunks];
}

/** Parses a safetensors file held in memory. Views into `bytes` where aligned, copies otherwise. */
export function decodeSafetensors(bytes: Uint8Array): SafeFile {
  if (bytes.byteLength < 8) throw new Error("safetensors: file shorter than its 8-byte header length");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (8 + headerLength > bytes.byteLength) throw new Error(`safetensors: header length ${headerLength} runs past the end of the file`);
  let header: Record<string, unknown>;
  try {
    header = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset + 8, headerLength).toString("utf8")) as Record<string, unknown>;
  } catch (err) {
    throw new Error(`safetensors: header is not JSON: ${(err as Error).message}`, { cause: err });
  }
  const dataStart = 8 + headerLength;
  const dataLength = bytes.byteLength - dataStart;
  const tensors: Record<string, SafeTensor> = {};
  let metadata: Record<string, string> = {};
  const spans: Array<[number, number]> = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = raw as Record<string, string>;
      continue;
    }
    const e = raw as HeaderEntry;
    const width = WIDTH[e.dtype];
    if (!width) throw new Error(`safetensors: ${name} has unsupported dtype ${String(e.dtype)}`);
    const [begin, end] = e.data_offsets;
    const elements = e.shape.reduce((a, b) => a * b, 1);
    if (!(begin >= 0 && end <= dataLength && end - begin === elements * width)) {
      throw new Error(`safetensors: ${name} offsets [${begin}, ${end}] do not fit shape [${e.shape.join(", ")}] x ${width} bytes`);
    }
    spans.push([begin, end]);
    let at = bytes.byteOffset + dataStart + begin;
    let buffer = bytes.buffer;
    if (at % width !== 0) {
      // A Buffer's slice() is a view, so copy through a fresh Uint8Array.
      buffer = new Uint8Array(bytes.subarray(dataStart + begin, dataStart + end)).buffer;
      at = 0;
    }
    tensors[name] = { dtype: e.dtype, shape: e.shape, data: new ARRAY[e.dtype](buffer, at, elements) };
  }
  spans.sort((a, b) => a[0] - b[0]);
  let covered = 0;
  for (const [begin, end] of spans) {
    if (begin !== covered) throw new Error(`safetensors: data has a gap or overlap at byte ${covered}`);
    covered = end;
  }
  if (covered !== dataLength) throw new Error(`safetensors: ${dataLength - covered} trailing bytes after the last tensor`);
  return { tensors, metadata };
}

export function readSafetensors(path: string): SafeFile {
  return decodeSafetensors(readFileSync(path));
}

/**
 * Writes a safetensors file atomically: into a temporary file beside it, flushed to disk, then
 * renamed over `path`. A crash mid-write leaves the previous file intact.
 */
export function writeSafetensors(path: string, tensors: Record<string, SafeTensor>, metadata: Record<string, string> = {}): void {
  writeAtomic(path, encodeSafetensors(tensors, metadata));
}

/** Writes `chunks` to `path` through a flushed temporary file and a rename. */
export function writeAtomic(path: string, chunks: readonly Uint8Array[]): void {
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, "w");
  try {
    for (const chunk of chunks) {
      for (let done = 0; done < chunk.byteLength;) done += writeSync(fd, chunk, done, chunk.byteLength - done);
    }
    fsyncSync(fd);
  } catch (err) {
    closeSync(fd);
    rmSync(tmp, { force: true });
    throw err;
  }
  closeSync(fd);
  renameSync(tmp, path);
  syncDir(dirname(path));
}

/** Makes a rename durable by flushing its directory. */
export function syncDir(dir: string): void {
  const fd = openSync(dir, "r");
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}
