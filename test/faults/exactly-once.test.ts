import assert from "node:assert/strict";
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, describe, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { Demand, MemberAnnounce, RunState, TrainerDone } from "../../services/common/coordination.js";
import { connectBus } from "../../services/common/nats.js";
import type { BatchesResponse } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { collectBatches, type Harness, HOOK, hookStatus, makeChunk, PushClient, startHarness } from "../buffer/support.js";

// The buffer's side of "never accept a row twice" (real nats-server and gRPC): rows are named by
// producer, lineage, context id and position (services/buffer/marks.ts), and that naming survives a
// producer's crash, the buffer's own restart (state file, or the producers' announcements), and a
// trainer's broken stream (its place in the pool is kept).
const tmp = mkdtempSync(join(tmpdir(), "saeflow-exactly-once-"));
let harnesses: Harness[] = [];
afterEach(async () => {
  for (const h of harnesses) await h.close();
  harnesses = [];
});
after(() => rmSync(tmp, { recursive: true, force: true }));

async function harness(sets: string[] = []): Promise<Harness> {
  const h = await startHarness(["buffer.pushWaitMs=200", ...sets]);
  harnesses.push(h);
  return h;
}

const chunk = (sequence: number, contexts: number[], producerId = "p") =>
  makeChunk({ producerId, producerNumber: 0, sequence, contexts, rowsPerContext: 64 });

/** Every row the pool serves once drained, by (context id, token id): the rows and how often each came. */
async function drainedRows(h: Harness): Promise<Map<string, number>> {
  await h.client.drain({});
  const batches = await collectBatches(h.client, { trainerId: "check", batchSize: 64 });
  const seen = new Map<string, number>();
  for (const b of batches) b.contextIds.forEach((c, i) => seen.set(`${c}/${b.tokenIds[i]}`, (seen.get(`${c}/${b.tokenIds[i]}`) ?? 0) + 1));
  return seen;
}

const rowIdsOf = (batches: BatchesResponse[]) => batches.flatMap((b) => b.rowIds.map(Number));

describe("no row accepted twice", () => {
  test("a producer that crashed re-sends from an older position, chunked otherwise: the rows it had sent are duplicates", async () => {
    const h = await harness();
    const before = new PushClient(h.client);
    for (const [i, contexts] of [
      [0, 1],
      [2, 3],
      [4, 5],
    ].entries())
      assert.equal((await before.send(chunk(i, contexts))).rowsAccepted, 128);
    before.cancel();
    // The restarted producer numbers its chunks from where its saved position was, and its grant sizes its passes.
    const after = new PushClient(h.client);
    const answers = [await after.send(chunk(1, [2])), await after.send(chunk(2, [3, 4])), await after.send(chunk(3, [5, 6]))];
    assert.deepEqual(
      answers.map((a) => [a.code, a.rowsAccepted, a.rowsDropped]),
      [
        [status.OK, 0, 64],
        [status.OK, 0, 128],
        [status.OK, 64, 64],
      ],
    );
    const s = await hookStatus(h);
    assert.equal(s.rowsIn, 448n);
    assert.deepEqual(
      s.dropped.map((d) => [d.reason, d.rows]),
      [["duplicate", 256n]],
    );
    const rows = await drainedRows(h);
    assert.equal(rows.size, 7 * 64);
    assert.ok(
      [...rows.values()].every((n) => n === 1),
      "every row of contexts 0..6 served once",
    );
  });

  test("a producer that starts its shard afresh (another lineage) is not taken for a duplicate", async () => {
    const h = await harness();
    const bus = await connectBus({ url: h.nats.url, name: "lineage" });
    const announce = (lineage: string): MemberAnnounce => ({ producerId: "p", hookPoints: [HOOK], address: "", chunkRows: 64, lineage });
    try {
      await bus.request(h.subjects.hello, MemberAnnounce, announce("first"), Demand, 5000);
      const push = new PushClient(h.client);
      assert.equal((await push.send(chunk(0, [0]))).rowsAccepted, 64);
      assert.equal((await push.send(chunk(1, [0]))).rowsDropped, 64, "same lineage: a duplicate");
      await bus.request(h.subjects.hello, MemberAnnounce, announce("second"), Demand, 5000);
      assert.equal((await push.send(chunk(0, [0]))).rowsAccepted, 64, "another lineage: other rows");
      await push.end();
    } finally {
      await bus.drain();
    }
  });

  test("a buffer restarted from its state file goes on with its ledger and marks; the rows its pool held are lost_with_buffer", async () => {
    const stateFile = join(tmp, "restart.state.json");
    const first = await harness([`buffer.stateFile=${stateFile}`]);
    const push = new PushClient(first.client);
    // A full pool (batches are served once it was first full), one batch of it served.
    for (let i = 0; i < 16; i++) await push.send(chunk(i, [i]));
    const served = await collectBatches(first.client, { trainerId: "t", batchSize: 64, maxBatches: 1n });
    // The file as a buffer killed at this moment leaves it (close() would mark it clean).
    const crashed = join(tmp, "crashed.state.json");
    copyFileSync(stateFile, crashed);
    push.cancel();

    const second = await harness([`buffer.stateFile=${crashed}`]);
    const again = new PushClient(second.client);
    const answers = [await again.send(chunk(15, [15])), await again.send(chunk(16, [16]))];
    assert.deepEqual(
      answers.map((a) => [a.rowsAccepted, a.rowsDropped]),
      [
        [0, 64],
        [64, 0],
      ],
      "the answered chunk is a duplicate, the next one is new",
    );
    const s = await hookStatus(second);
    assert.equal(s.rowsIn, 17n * 64n, "accepted across both buffers");
    assert.equal(s.rowsOut, 64n, "served by the first");
    assert.deepEqual(
      s.dropped.map((d) => [d.reason, d.rows]),
      [
        ["duplicate", 64n],
        ["lost_with_buffer", 15n * 64n],
      ],
    );
    assert.equal(s.rowsIn, s.rowsOut + s.unconsumedRows + 15n * 64n, "accepted = served + held + lost");
    await second.client.drain({});
    const later = await collectBatches(second.client, { trainerId: "t", batchSize: 64 });
    const ids = [...rowIdsOf(served), ...rowIdsOf(later)];
    assert.equal(new Set(ids).size, ids.length, "row ids go on: none given twice in the run");
    again.cancel();
  });

  test("a buffer restarted without its state file learns from the producers' announcements what was answered", async () => {
    const h = await harness();
    const bus = await connectBus({ url: h.nats.url, name: "marks" });
    try {
      const announce: MemberAnnounce = {
        producerId: "p",
        hookPoints: [HOOK],
        address: "",
        chunkRows: 64,
        lineage: "l",
        marks: { [HOOK]: { sent: 5, answered: 3 } },
      };
      await bus.request(h.subjects.hello, MemberAnnounce, announce, Demand, 5000);
      const push = new PushClient(h.client);
      // Contexts 3 and 4 were in flight when the old buffer died: the producer re-sends them.
      assert.deepEqual([(await push.send(chunk(2, [2]))).rowsDropped, (await push.send(chunk(3, [3, 4]))).rowsAccepted], [64, 128]);
      await push.end();
    } finally {
      await bus.drain();
    }
  });
});

describe("trainers that go away", () => {
  test("a trainer whose stream broke reads on from its place: no row id twice within a fill", async () => {
    const h = await harness();
    const push = new PushClient(h.client);
    for (let i = 0; i < 16; i++) await push.send(chunk(i, [i]));
    // A second fan-out trainer, slower, so that the rows the first read stay in the pool.
    const slow = h.client.batches({ hookPoint: HOOK, trainerId: "slow", batchSize: 64, includeIds: true });
    slow.on("error", () => undefined);
    slow.pause();
    const first = h.client.batches({ hookPoint: HOOK, trainerId: "t", batchSize: 64, includeIds: true });
    first.on("error", () => undefined);
    const got: BatchesResponse[] = [];
    for await (const b of first as AsyncIterable<BatchesResponse>) {
      got.push(b);
      if (got.length === 4) break;
    }
    first.cancel();
    await new Promise((r) => setTimeout(r, 100));
    await h.client.drain({});
    slow.cancel();
    got.push(...(await collectBatches(h.client, { trainerId: "t", batchSize: 64 })));
    const ids = rowIdsOf(got);
    // Batches in flight when the stream broke were served and lost with it; none comes twice. Without
    // its kept place, the trainer would read again from the slow one's position the rows it had.
    assert.ok(ids.length > 4 * 64, `it read on after the break (${ids.length} rows)`);
    assert.equal(new Set(ids).size, ids.length, "no row twice, across the break");
  });

  test("a buffer stopped without a drain ends trainer streams UNAVAILABLE, so that they reconnect", async () => {
    const h = await harness();
    const stream = assert.rejects(
      collectBatches(h.client, { trainerId: "t", batchSize: 64 }),
      (err: { code: number }) => err.code === status.UNAVAILABLE,
    );
    await new Promise((r) => setTimeout(r, 200));
    await h.running.stop();
    await stream;
  });

  test("once every trainer is done the buffer stops its producers and ends: the run finishes by itself", async () => {
    const h = await harness(["buffer.trainers=1"]);
    const bus = await connectBus({ url: h.nats.url, name: "watch" });
    const states: string[] = [];
    bus.subscribe(h.subjects.runState, RunState, (m) => states.push(`${m.state}: ${m.reason}`));
    try {
      const push = new PushClient(h.client);
      await push.send(chunk(0, [0]));
      const stream = collectBatches(h.client, { trainerId: "t", batchSize: 64 });
      await new Promise((r) => setTimeout(r, 200));
      bus.publish(h.subjects.trainerDone, TrainerDone, { trainerId: "t", hookPoints: [HOOK], step: 10 });
      await h.running.finished;
      await stream;
      assert.equal(h.running.status().state, ServiceState.STOPPED);
      const late = await push.send(chunk(1, [1]));
      assert.equal(late.code, status.FAILED_PRECONDITION, "no row is taken after the end");
      // Published by the buffer's own connection: they reach this one a moment later.
      for (const until = Date.now() + 5000; states.length < 2 && Date.now() < until;) await new Promise((r) => setTimeout(r, 50));
      assert.deepEqual(states, ["draining: every trainer is done", "stopped: every trainer is done"]);
      push.cancel();
    } finally {
      await bus.drain();
    }
  });
});
