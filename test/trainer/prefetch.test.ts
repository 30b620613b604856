import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { setImmediate as turn } from "node:timers/promises";
import { ConfigError } from "../../services/common/config/index.js";
import type { RunningServer } from "../../services/common/grpc/server.js";
import { bf16ToFp32, fp32ToBf16 } from "../../services/common/tensor-codec.js";
import type { DTypeName } from "../../services/common/config/sections/dtype.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { PrefetchedBatches } from "../../services/trainer/prefetch.js";
import { gaussianBatch, testConfig } from "./fixtures.js";
import { startSyntheticBuffer } from "./synthetic-buffer.js";

// The trainer's batch stream on its own thread: batches arrive while the training thread is busy
// in a step (onnxruntime-node runs a step on the calling thread), 16-bit rows are widened there when
// the step wants float32, and its errors come across with their key.
const HOOK = "blocks.1.hook_resid_post";
const D = 64;
const ROWS = 8192;
const rows = gaussianBatch(ROWS, D, "prefetch");
const root = mkdtempSync(join(tmpdir(), "saeflow-prefetch-"));
let fp32: RunningServer;
let bf16: RunningServer;

before(async () => {
  const config = testConfig(root, {}, { dModel: D });
  fp32 = await startSyntheticBuffer({ config, hookPoint: HOOK, dModel: D, rows, dtype: DType.FP32 });
  bf16 = await startSyntheticBuffer({ config, hookPoint: HOOK, dModel: D, rows, dtype: DType.BF16 });
});
after(async () => {
  await fp32.close(100);
  await bf16.close(100);
  rmSync(root, { recursive: true, force: true });
});

/** The buffer's stream of HOOK on its own thread, for a run whose pool is `dModel` wide. */
const prefetched = (buffer: RunningServer, widen: DTypeName[] = [], dModel = D) =>
  new PrefetchedBatches(
    testConfig(root, { batchSize: ROWS }, { address: buffer.address, hookPoint: HOOK, dModel }),
    { hookPoint: HOOK, address: buffer.address },
    widen,
  );

/** Holds this thread as a synchronous onnxruntime step would. */
function busy(ms: number): void {
  const end = performance.now() + ms;
  while (performance.now() < end);
}

describe("batches received on their own thread", { timeout: 60_000 }, () => {
  test("the next batch (2 MiB) is received and decoded while the training thread is held, ready at its first turn", async () => {
    const source = prefetched(fp32);
    try {
      const first = await source.next();
      assert.equal(first?.rows, ROWS);
      assert.equal(source.waiting, 0);
      busy(1500);
      // One turn of the event loop delivers what the other thread posted meanwhile; a stream on this
      // thread would have had to read 2 MiB through HTTP/2 flow control after the hold.
      await turn();
      assert.equal(source.waiting, 1);
      const second = await source.next();
      assert.deepEqual(Array.from((second!.data as Float32Array).subarray(0, 8)), Array.from(rows.subarray(0, 8)));
    } finally {
      source.close();
    }
  });

  test("bf16 rows are widened to float32 there when the step takes float32, and handed over as words otherwise", async () => {
    const widened = prefetched(bf16, ["bf16"]);
    const words = prefetched(bf16);
    try {
      const a = (await widened.next())!;
      const b = (await words.next())!;
      assert.deepEqual([a.dtype, b.dtype], ["fp32", "bf16"]);
      const expected = Array.from(rows.subarray(0, 16), (v) => bf16ToFp32(fp32ToBf16(v)));
      assert.deepEqual(Array.from((a.data as Float32Array).subarray(0, 16)), expected);
      assert.deepEqual(Array.from((b.data as Uint16Array).subarray(0, 16), bf16ToFp32), expected);
    } finally {
      widened.close();
      words.close();
    }
  });

  test("a batch the trainer cannot take fails next() with the key at fault", async () => {
    const source = prefetched(fp32, [], 32);
    try {
      await assert.rejects(source.next(), (err: unknown) => err instanceof ConfigError && err.keys[0] === "buffer.hookPoints.0.dModel");
    } finally {
      source.close();
    }
  });

  test("close() ends the stream: next() resolves undefined", async () => {
    const source = prefetched(fp32);
    await source.next();
    source.close();
    assert.equal(await source.next(), undefined);
  });
});
