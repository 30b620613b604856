import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { collectBatches, type Harness, hookStatus, HOOK, startHarness, TestProducer } from "./support.js";

let h: Harness;
before(async () => {
  h = await startHarness();
});
after(async () => {
  await h.close();
});

test("refill starts at half and stops at full", async () => {
  const p = new TestProducer(h, "p0", 0);
  await p.join();
  const first = await p.until((d) => d.command === "refill" && (d.grants.p0 ?? 0) > 0);
  assert.equal(first.grants.p0, 1024, "the whole empty pool is granted, in whole chunks");
  await p.pushWithinCredit();
  const full = await p.until((d) => d.command === "pause");
  assert.equal(full.freeRows[HOOK], 0);
  let s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 1024n);
  assert.equal(s.refilling, false);
  assert.equal(s.refillCycles, 1n);

  // 7 batches of 64 leave 576 rows: above half, no refill yet.
  assert.equal((await collectBatches(h.client, { trainerId: "t0", batchSize: 64, maxBatches: 7n })).length, 7);
  s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 576n);
  assert.equal(s.refilling, false);
  assert.equal(s.refillCycles, 1n);
  assert.equal(p.credit, 0);

  // The 8th reaches half: a refill cycle starts and asks for exactly the consumed half.
  await collectBatches(h.client, { trainerId: "t0", batchSize: 64, maxBatches: 1n });
  s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 512n);
  assert.equal(s.refilling, true);
  assert.equal(s.refillCycles, 2n);
  const refill = await p.until((d) => d.command === "refill" && d.cycle === 2);
  assert.equal(refill.freeRows[HOOK], 512);
  assert.equal(p.credit, 512);

  await p.pushWithinCredit();
  await p.until((d) => d.command === "pause" && d.cycle === 2);
  s = await hookStatus(h);
  assert.equal(s.unconsumedRows, 1024n);
  assert.equal(s.refilling, false);
  assert.deepEqual(s.dropped, []);
  await p.leave();
});
