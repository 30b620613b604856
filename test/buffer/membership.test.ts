import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";
import { fromTensor } from "../../services/common/tensor-codec.js";
import type { BatchesResponse } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { collectBatches, D_MODEL, type Harness, HOOK, hookStatus, startHarness, TestProducer } from "./support.js";

// pushWaitMs is short so that a producer overshooting the pool would show as pool_full drops.
let h: Harness;
let producers: TestProducer[] = [];
beforeEach(async () => {
  h = await startHarness(["buffer.pushWaitMs=300"]);
});
afterEach(async () => {
  for (const p of producers) await p.leave();
  producers = [];
  await h.close();
});

async function producer(id: string, number: number): Promise<TestProducer> {
  const p = new TestProducer(h, id, number);
  producers.push(p);
  await p.join();
  return p;
}

/** Producer numbers present in batches (element 2 of each row, see makeChunk). */
function producersIn(batches: BatchesResponse[]): Set<number> {
  const seen = new Set<number>();
  for (const b of batches) {
    const values = fromTensor(b.activations!);
    for (let i = 0; i < b.activations!.shape[0]!; i++) seen.add(values[i * D_MODEL + 2]!);
  }
  return seen;
}

/** Drains the pool to half with a trainer, so the buffer asks for a refill. */
const consumeHalf = () => collectBatches(h.client, { trainerId: "t", batchSize: 64, maxBatches: 8n });

test("two producers join mid-run and one leaves; grants never overshoot the pool", async () => {
  const a = await producer("a", 0);
  await a.produce(16);
  await a.until((d) => d.command === "pause");

  const b = await producer("b", 1);
  const c = await producer("c", 2);
  assert.deepEqual((await hookStatus(h)).producers.sort(), ["a", "b", "c"]);
  const seen = await consumeHalf();
  const demand = await a.until((d) => d.command === "refill" && d.cycle === 2);
  const credits = [a, b, c].map((p) => (demand.grants[p.id] ?? 0) - p.sent);
  assert.deepEqual(credits, [192, 192, 128], "512 free rows split in whole chunks among three producers");
  await Promise.all([a, b, c].map((p) => p.pushWithinCredit()));
  await a.until((d) => d.command === "pause" && d.cycle === 2);

  await c.leave();
  assert.deepEqual((await hookStatus(h)).producers.sort(), ["a", "b"]);
  seen.push(...(await consumeHalf()));
  const later = await a.until((d) => d.command === "refill" && d.cycle === 3);
  assert.equal(later.grants.c, undefined);
  assert.deepEqual(
    [a, b].map((p) => (later.grants[p.id] ?? 0) - p.sent),
    [256, 256],
  );
  await Promise.all([a, b].map((p) => p.pushWithinCredit()));
  await a.until((d) => d.command === "pause" && d.cycle === 3);

  await h.client.drain({});
  seen.push(...(await collectBatches(h.client, { trainerId: "t", batchSize: 64 })));
  assert.deepEqual([...producersIn(seen)].sort(), [0, 1, 2]);
  const s = await hookStatus(h);
  assert.deepEqual(s.dropped, [], "no chunk had to wait for room");
  assert.equal(s.rowsIn, BigInt(a.sent + b.sent + c.sent));
  assert.equal(s.rowsOut, s.rowsIn);
});

test("a producer whose heartbeats stop lapses, and its unused credit goes to the others", async () => {
  const a = await producer("a", 0);
  await a.produce(16);
  await a.until((x) => x.command === "pause");
  const d = await producer("d", 1);
  d.fallSilent();
  await consumeHalf();
  const split = await a.until((x) => x.command === "refill" && x.grants.d !== undefined && x.cycle === 2);
  assert.deepEqual([(split.grants.a ?? 0) - a.sent, split.grants.d], [256, 256]);
  await a.pushWithinCredit();
  // d never sends: once it lapses, a is granted the 256 rows d was promised.
  const regranted = await a.until((x) => x.grants.d === undefined && (x.grants.a ?? 0) - a.sent === 256);
  assert.equal(regranted.command, "refill");
  await a.pushWithinCredit();
  await a.until((x) => x.command === "pause");
  const s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 1024n);
  assert.deepEqual(s.producers, ["a"]);
  assert.deepEqual(s.dropped, []);
});

test("rows that reached the buffer before their producer joined stop holding its grant once it says they settled", async () => {
  const p = new TestProducer(h, "r", 0);
  producers.push(p);
  // A restarted buffer can take re-sent rows before the hello that makes their producer a member:
  // the producer counts them against the grant the hello starts, the buffer did not see them come.
  await p.pushBeforeJoining(4);
  await p.join();
  await p.pushWithinCredit();
  const stuck = await p.until((d) => d.freeRows[HOOK] === 256);
  assert.equal(stuck.command, "refill");
  assert.equal(p.credit, 0, "the 256 rows it sent before joining are still promised to it");
  p.announceSettled();
  await p.until((d) => d.command === "refill" && p.credit === 256);
  await p.pushWithinCredit();
  await p.until((d) => d.command === "pause");
  const s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 1024n);
  assert.deepEqual(s.dropped, []);
});

test("credit a producer cannot spend does not keep a pool short of full: the refill ends", async () => {
  const p = new TestProducer(h, "a", 0, 64, 4);
  producers.push(p);
  await p.join();
  // The whole pool is granted (1,024 rows, 4 chunks of 256); the last chunk's contexts are packed
  // shorter than the bound (40 rows, not 64), so 96 rows of credit stay, too few for a chunk.
  await Promise.all([p.pushChunk(), p.pushChunk(), p.pushChunk(), p.pushChunk(40)]);
  await p.until((d) => d.command === "pause");
  await collectBatches(h.client, { trainerId: "t", batchSize: 64, maxBatches: 7n });
  // Down to 480 rows: a refill grants the one chunk that fits beside the 96 rows still promised.
  await p.until((d) => d.command === "refill" && d.grants.a === 1280);
  await p.pushChunk();
  // 288 rows are free, more than a chunk, but 96 of them are promised to credit that cannot be spent:
  // no grant can add a chunk, so the pool counts as full and the producers are told to pause.
  const paused = await p.until((d) => d.command === "pause");
  assert.equal(paused.freeRows[HOOK], 288);
  const s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 736n);
  assert.equal(s.refilling, false);
  assert.deepEqual(s.dropped, []);
});
