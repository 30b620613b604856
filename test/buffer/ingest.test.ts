import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { toTensor } from "../../services/common/tensor-codec.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { collectBatches, D_MODEL, type Harness, hookStatus, makeChunk, PushClient, rowsMatchIds, startHarness } from "./support.js";

let h: Harness | undefined;
afterEach(async () => {
  await h?.close();
  h = undefined;
});

const good = (sequence: number, context: number) =>
  makeChunk({ producerId: "p", producerNumber: 0, sequence, contexts: [context], rowsPerContext: 64 });

test("bad chunks are rejected without losing accepted rows", async () => {
  h = await startHarness();
  const push = new PushClient(h.client);
  const first = await push.send(good(0, 0));
  assert.equal(first.code, status.OK);
  assert.equal(first.rowsAccepted, 64);
  assert.equal(first.freeRows, 960n);

  const refusals: Array<[ReturnType<typeof good>, RegExp]> = [];
  const wide = makeChunk({ producerId: "p", producerNumber: 0, sequence: 1, contexts: [1], rowsPerContext: 64, dModel: 32 });
  refusals.push([wide, /^chunk\.activations\.shape: dimension 1 is 32, expected 16$/]);
  const half = good(1, 1);
  half.chunk!.activations = toTensor(new Uint16Array(64 * D_MODEL), DType.FP16, [64, D_MODEL]);
  refusals.push([half, /^chunk\.activations\.dtype: got FP16, expected FP32$/]);
  const short = good(1, 1);
  short.chunk!.activations!.data = short.chunk!.activations!.data!.subarray(0, 63 * D_MODEL * 4);
  refusals.push([short, /^chunk\.activations\.data: 4032 bytes, but shape \[64, 16\]/]);
  const elsewhere = good(1, 1);
  elsewhere.chunk!.hookPoint = "blocks.9.hook_resid_post";
  refusals.push([elsewhere, /^chunk\.hook_point: unknown hook point "blocks\.9\.hook_resid_post"/]);
  const ids = good(1, 1);
  ids.chunk!.contextIds = [1];
  refusals.push([ids, /^chunk\.context_ids: 1 ids for 64 rows/]);
  const tokens = good(1, 1);
  tokens.chunk!.tokenIds = [1, 2];
  refusals.push([tokens, /^chunk\.token_ids: 2 ids for 64 rows/]);
  const anonymous = good(1, 1);
  anonymous.chunk!.producerId = "";
  refusals.push([anonymous, /^chunk\.producer_id: empty$/]);
  for (const [chunk, message] of refusals) {
    const answer = await push.send(chunk);
    assert.equal(answer.code, status.INVALID_ARGUMENT, answer.message);
    assert.match(answer.message, message);
    assert.equal(answer.rowsAccepted, 0);
  }

  const poisoned = await push.send(
    makeChunk({ producerId: "p", producerNumber: 0, sequence: 1, contexts: [1], rowsPerContext: 64, poison: 5 }),
  );
  assert.equal(poisoned.code, status.INVALID_ARGUMENT);
  assert.equal(poisoned.message, "chunk.activations.data: row 5 holds NaN or Inf; the chunk was refused");
  assert.deepEqual([poisoned.rowsAccepted, poisoned.rowsDropped], [0, 64]);

  const again = await push.send(good(0, 0));
  assert.deepEqual(
    [again.code, again.rowsAccepted, again.rowsDropped],
    [status.OK, 0, 64],
    "a re-sent chunk is acknowledged, not counted twice",
  );
  const second = await push.send(good(2, 2));
  assert.deepEqual([second.code, second.rowsAccepted], [status.OK, 64], "the stream goes on after refusals");

  await assert.rejects(
    push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: 3, contexts: [3], rowsPerContext: 64, runId: "other" })),
    (err: { code: number; details: string }) => {
      assert.equal(err.code, status.FAILED_PRECONDITION);
      assert.match(err.details, /^chunk\.run_id: "other" is not this buffer's run "test"$/);
      return true;
    },
  );

  const s = await hookStatus(h);
  assert.equal(s.rowsIn, 128n);
  assert.deepEqual(
    s.dropped.map((d) => [d.reason, d.rows]),
    [
      ["duplicate", 64n],
      ["non_finite", 64n],
    ],
  );
  await h.client.drain({});
  const batches = await collectBatches(h.client, { trainerId: "t", batchSize: 48 });
  assert.deepEqual(
    batches.map((b) => b.activations!.shape[0]),
    [48, 48, 32],
    "draining serves what is held, the last batch short",
  );
  assert.ok(batches.every((b) => rowsMatchIds(b)));
  assert.deepEqual([...new Set(batches.flatMap((b) => b.contextIds))].sort(), [0, 2]);
  assert.equal((await hookStatus(h)).state, ServiceState.STOPPED);
});

test("a chunk that finds the pool full waits, then drops the rest as pool_full", async () => {
  h = await startHarness(["buffer.pushWaitMs=200"]);
  const push = new PushClient(h.client);
  const answers = await Promise.all(Array.from({ length: 17 }, (_, i) => push.send(good(i, i))));
  assert.ok(answers.slice(0, 16).every((a) => a.code === status.OK && a.rowsAccepted === 64));
  const last = answers[16]!;
  assert.equal(last.code, status.RESOURCE_EXHAUSTED);
  assert.match(last.message, /^chunk: 64 of 64 rows dropped: pool full for 200 ms$/);
  const s = await hookStatus(h);
  assert.deepEqual(
    s.dropped.map((d) => [d.reason, d.rows]),
    [["pool_full", 64n]],
  );
  assert.equal(s.rowsIn, 1024n);
});

test("pushes after a drain are dropped as draining", async () => {
  h = await startHarness();
  const push = new PushClient(h.client);
  await push.send(good(0, 0));
  const drained = await h.client.drain({});
  assert.equal(drained.state, ServiceState.DRAINING);
  assert.equal(drained.unconsumedRows, 64n);
  const late = await push.send(good(1, 1));
  assert.equal(late.code, status.FAILED_PRECONDITION);
  assert.equal(late.rowsDropped, 64);
  const s = await hookStatus(h);
  assert.deepEqual(
    s.dropped.map((d) => [d.reason, d.rows]),
    [["draining", 64n]],
  );
});
