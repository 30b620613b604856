import assert from "node:assert/strict";
import { afterEach, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { type BatchesResponse, ShareMode } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { attached, collectBatches, type Harness, HOOK, hookStatus, rowsMatchIds, startHarness, TestProducer } from "./support.js";

let h: Harness | undefined;
let producers: TestProducer[] = [];
afterEach(async () => {
  for (const p of producers) await p.leave();
  producers = [];
  await h?.close();
  h = undefined;
});

async function producer(harness: Harness, id: string, number: number): Promise<TestProducer> {
  const p = new TestProducer(harness, id, number);
  producers.push(p);
  await p.join();
  return p;
}

const rowIds = (batches: BatchesResponse[]) => batches.flatMap((b) => b.rowIds.map(Number));

test("two trainers in split mode never receive the same row within a fill", async () => {
  h = await startHarness();
  const p = await producer(h, "p", 0);
  // 2 x 40 batches of 32 rows: 2560 rows, two and a half fills of the 1024-row pool.
  const trainers = ["t0", "t1"].map((id) =>
    collectBatches(h!.client, { trainerId: id, group: "g", share: ShareMode.SPLIT, batchSize: 32, maxBatches: 40n }),
  );
  const producing = p.produce(48);
  const [a, b] = await Promise.all(trainers);
  await producing;
  const idsA = rowIds(a!);
  const idsB = rowIds(b!);
  assert.equal(idsA.length, 1280);
  assert.equal(idsB.length, 1280);
  assert.equal(new Set([...idsA, ...idsB]).size, 2560, "no row reached both trainers, nor one trainer twice");
  assert.ok([...a!, ...b!].every((batch) => rowsMatchIds(batch)));
  const s = await hookStatus(h);
  assert.equal(s.rowsOut, 2560n, "every slot was refilled at least twice");
  assert.ok(s.refillCycles >= 2n);
});

test("fan-out trainers each receive every row", async () => {
  h = await startHarness();
  const p = await producer(h, "p", 0);
  const trainers = ["t0", "t1"].map((id) =>
    collectBatches(h!.client, { trainerId: id, group: "sweep", share: ShareMode.FAN_OUT, batchSize: 100 }),
  );
  await attached(h, 2);
  await p.produce(16);
  await h.client.drain({});
  const [a, b] = await Promise.all(trainers);
  const all = Array.from({ length: 1024 }, (_, i) => i);
  assert.deepEqual(
    rowIds(a!).sort((x, y) => x - y),
    all,
  );
  assert.deepEqual(
    rowIds(b!).sort((x, y) => x - y),
    all,
  );
  assert.equal((await hookStatus(h)).rowsOut, 1024n, "a row sent to two fan-out trainers counts once");
});

test("a group keeps the share mode it started with; bad requests name the field", async () => {
  h = await startHarness();
  const split = h.client.batches({ hookPoint: HOOK, trainerId: "t0", group: "g", share: ShareMode.SPLIT, batchSize: 8 });
  split.on("error", () => undefined);
  await attached(h, 1);
  const refusals: Array<[Parameters<typeof collectBatches>[1], number, RegExp]> = [
    [
      { trainerId: "t1", group: "g", share: ShareMode.FAN_OUT, batchSize: 8 },
      status.FAILED_PRECONDITION,
      /^share: group "g" on .* is split; this trainer asked for fan_out$/,
    ],
    [{ trainerId: "t1", batchSize: 0 }, status.INVALID_ARGUMENT, /^batch_size: 0 is outside 1\.\.1024/],
    [{ trainerId: "t1", batchSize: 1025 }, status.INVALID_ARGUMENT, /^batch_size: 1025 is outside 1\.\.1024/],
    [{ trainerId: "", batchSize: 8 }, status.INVALID_ARGUMENT, /^trainer_id: empty$/],
    [{ trainerId: "t1", hookPoint: "nope", batchSize: 8 }, status.INVALID_ARGUMENT, /^hook_point: unknown hook point "nope"/],
  ];
  for (const [request, code, details] of refusals) {
    await assert.rejects(collectBatches(h.client, request), (err: { code: number; details: string }) => {
      assert.equal(err.code, code);
      assert.match(err.details, details);
      return true;
    });
  }
  split.cancel();
});

test("a minibatch taken right after a refill is not dominated by one context", async () => {
  h = await startHarness();
  const p = await producer(h, "p", 0);
  await p.produce(16); // contexts 0..15, 64 rows each
  await collectBatches(h.client, { trainerId: "t", batchSize: 64, maxBatches: 8n });
  await p.produce(8); // contexts 16..23 refill the consumed half
  const [batch] = await collectBatches(h.client, { trainerId: "t", batchSize: 128, maxBatches: 1n });
  const perContext = new Map<number, number>();
  for (const c of batch!.contextIds) perContext.set(c, (perContext.get(c) ?? 0) + 1);
  // Unshuffled, the next 128 rows would be two whole contexts (64 rows each).
  assert.equal(batch!.distinctContexts, perContext.size);
  assert.ok(perContext.size >= 12, `${perContext.size} distinct contexts`);
  assert.ok(Math.max(...perContext.values()) <= 24, `one context holds ${Math.max(...perContext.values())} of 128 rows`);
  assert.ok([...perContext.keys()].some((c) => c >= 16) && [...perContext.keys()].some((c) => c < 16), "new rows mix with what was left");
  assert.ok((await hookStatus(h)).meanDistinctContexts >= 12);
});

test("trainers keep getting batches while producers refill, and wait only when producers are slower", async () => {
  h = await startHarness();
  const p = await producer(h, "p", 0);
  await p.produce(16);
  const stream = h.client.batches({ hookPoint: HOOK, trainerId: "t", batchSize: 64, maxBatches: 14n }) as AsyncIterable<BatchesResponse>;
  const it = stream[Symbol.asyncIterator]();
  const got: BatchesResponse[] = [];
  // Down to half (8 batches) and on to the mixing floor (a quarter): the producer sends nothing meanwhile.
  for (let i = 0; i < 13; i++) got.push((await it.next()).value as BatchesResponse);
  const s = await hookStatus(h);
  assert.equal(s.refilling, true);
  assert.equal(s.unconsumedRows, 192n);
  assert.deepEqual(
    got.slice(8).map((b) => Number(b.fillCycle)),
    [2, 2, 2, 2, 2],
    "batches kept coming during the refill",
  );
  // The 14th would go under the floor: it waits for the producer, which sends once the refill's grant reaches it.
  await p.until(() => p.credit >= p.chunkRows);
  await p.pushWithinCredit(1);
  const last = (await it.next()).value as BatchesResponse;
  assert.ok(last.waitMs > 0);
  assert.equal((await it.next()).done, true);
  const after = await hookStatus(h);
  assert.ok(after.trainerWaitMs >= last.waitMs);
});
