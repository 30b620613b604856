import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import {
  decodeSafetensors,
  encodeSafetensors,
  readSafetensors,
  type SafeTensor,
  writeSafetensors,
} from "../../services/common/safetensors.js";

const concat = (chunks: Uint8Array[]) => Buffer.concat(chunks.map((c) => Buffer.from(c.buffer, c.byteOffset, c.byteLength)));

describe("safetensors", () => {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-st-"));
  after(() => rmSync(dir, { recursive: true, force: true }));

  test("reads a file laid out by hand as the format describes", () => {
    const header = JSON.stringify({ w: { dtype: "F32", shape: [2, 1], data_offsets: [0, 8] }, __metadata__: { k: "v" } });
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(header.length));
    const data = Buffer.from(new Float32Array([1.5, -2]).buffer);
    const file = decodeSafetensors(Buffer.concat([prefix, Buffer.from(header), data]));
    assert.deepEqual(file.metadata, { k: "v" });
    assert.deepEqual(file.tensors.w!.shape, [2, 1]);
    assert.deepEqual(Array.from(file.tensors.w!.data as Float32Array), [1.5, -2]);
  });

  test("every dtype round-trips, with metadata, and data starts 8-byte aligned", () => {
    const tensors: Record<string, SafeTensor> = {
      f64: { dtype: "F64", shape: [3], data: new Float64Array([1, 2.5, -1e300]) },
      f32: { dtype: "F32", shape: [2, 2], data: new Float32Array([1, 2, 3, 4]) },
      f16: { dtype: "F16", shape: [1], data: new Uint16Array([0x3c00]) },
      bf16: { dtype: "BF16", shape: [2], data: new Uint16Array([0x3f80, 0xc000]) },
      i64: { dtype: "I64", shape: [2], data: new BigInt64Array([-1n, 1n << 40n]) },
      i32: { dtype: "I32", shape: [1], data: new Int32Array([-7]) },
      u8: { dtype: "U8", shape: [3], data: new Uint8Array([1, 2, 255]) },
    };
    const bytes = concat(encodeSafetensors(tensors, { step: "3" }));
    assert.equal(Number(bytes.readBigUInt64LE(0)) % 8, 0);
    const back = decodeSafetensors(bytes);
    assert.deepEqual(back.metadata, { step: "3" });
    for (const [name, t] of Object.entries(tensors)) {
      assert.equal(back.tensors[name]!.dtype, t.dtype);
      assert.deepEqual(back.tensors[name]!.shape, t.shape);
      assert.deepEqual(
        Array.from(back.tensors[name]!.data as ArrayLike<number | bigint>),
        Array.from(t.data as ArrayLike<number | bigint>),
      );
    }
  });

  test("malformed files are refused with a reason", () => {
    const good = concat(encodeSafetensors({ a: { dtype: "F32", shape: [2], data: new Float32Array([1, 2]) } }));
    assert.throws(() => decodeSafetensors(good.subarray(0, 4)), /shorter than/);
    assert.throws(() => decodeSafetensors(good.subarray(0, good.length - 4)), /offsets/);
    assert.throws(() => decodeSafetensors(Buffer.concat([good, Buffer.alloc(4)])), /trailing/);
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(1000n);
    assert.throws(() => decodeSafetensors(Buffer.concat([prefix, Buffer.from("{}")])), /runs past/);
    const gap = JSON.stringify({ a: { dtype: "F32", shape: [1], data_offsets: [4, 8] } });
    const p2 = Buffer.alloc(8);
    p2.writeBigUInt64LE(BigInt(gap.length));
    assert.throws(() => decodeSafetensors(Buffer.concat([p2, Buffer.from(gap), Buffer.alloc(8)])), /gap/);
    assert.throws(() => encodeSafetensors({ a: { dtype: "F32", shape: [3], data: new Float32Array(2) } }), /elements/);
  });

  test("writes atomically: the file is replaced whole and no temporary is left", () => {
    const path = join(dir, "w.safetensors");
    writeSafetensors(path, { a: { dtype: "F32", shape: [1], data: new Float32Array([1]) } });
    const before = readFileSync(path);
    writeFileSync(`${path}.tmp-1`, "junk from a crashed writer");
    writeSafetensors(path, { a: { dtype: "F32", shape: [2], data: new Float32Array([2, 3]) } });
    assert.notDeepEqual(readFileSync(path), before);
    assert.deepEqual(Array.from(readSafetensors(path).tensors.a!.data as Float32Array), [2, 3]);
    assert.deepEqual(readdirSync(dir).sort(), ["w.safetensors", "w.safetensors.tmp-1"]);
  });
});
