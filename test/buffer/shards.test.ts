import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { Demand, MemberAnnounce, RunState, subjects, TrainerDone } from "../../services/common/coordination.js";
import { connectBus } from "../../services/common/nats.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { readersOf } from "../../services/buffer/run-end.js";
import { ActivationBuffer } from "../../services/buffer/activation-buffer.js";
import { BufferStateFile } from "../../services/buffer/state-file.js";
import { loadConfig } from "../../services/common/config/index.js";
import type { BatchesResponse } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { collectBatches, D_MODEL, type Harness, HOOK, makeChunk, PushClient, startHarness, TestProducer } from "./support.js";

// One buffer process of a sharded run: shard 1 of two, holding HOOK while shard 0 holds OTHER.
const OTHER = "blocks.0.hook_resid_post";
const SHARD_SETS = [
  `buffer.hookPoints=[{name: ${OTHER}, dModel: ${D_MODEL}}, {name: ${HOOK}, dModel: ${D_MODEL}}]`,
  `buffer.shards=[{address: "127.0.0.1:1", hookPoints: [${OTHER}]}, {address: "127.0.0.1:2", hookPoints: [${HOOK}]}]`,
  "buffer.shard=1",
  `trainer.hookPoints=[${OTHER}, ${HOOK}]`,
];

let h: Harness | undefined;
afterEach(async () => {
  await h?.close();
  h = undefined;
});

test("a shard allocates only its pools, says which shard it is, and refuses another shard's hook point naming the field", async () => {
  h = await startHarness(SHARD_SETS);
  const s = await h.client.status({});
  assert.equal(s.shard, 1);
  assert.equal(s.shardCount, 2);
  assert.deepEqual(
    s.hookPoints.map((p) => p.hookPoint),
    [HOOK],
  );
  assert.equal(h.running.buffer.bytes, 1024 * D_MODEL * 4, "one pool allocated, not two");

  const push = new PushClient(h.client);
  const refused = await push.send(
    makeChunk({ producerId: "p", producerNumber: 0, sequence: 0, contexts: [0], rowsPerContext: 4, hookPoint: OTHER }),
  );
  assert.equal(refused.code, status.INVALID_ARGUMENT);
  assert.match(
    refused.message,
    /^chunk\.hook_point: "blocks\.0\.hook_resid_post" is held by shard 0 \(127\.0\.0\.1:1\), not here; this buffer \(shard 1\) holds blocks\.1\.hook_resid_post$/,
  );
  const accepted = await push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: 0, contexts: [0], rowsPerContext: 4 }));
  assert.equal(accepted.code, status.OK);
  assert.equal(accepted.rowsAccepted, 4);
  await push.end();

  await assert.rejects(
    collectBatches(h.client, { hookPoint: OTHER, trainerId: "t", batchSize: 4 }),
    (err: { code: number; details: string }) => {
      assert.equal(err.code, status.INVALID_ARGUMENT);
      assert.match(err.details, /^hook_point: "blocks\.0\.hook_resid_post" is held by shard 0 \(127\.0\.0\.1:1\), not here/);
      return true;
    },
  );
  await assert.rejects(
    collectBatches(h.client, { hookPoint: "nope", trainerId: "t", batchSize: 4 }),
    /hook_point: unknown hook point "nope"/,
  );
});

test("membership, hello and demand are on the shard's own subjects", async () => {
  h = await startHarness(SHARD_SETS);
  const bus = await connectBus({ url: h.nats.url, name: "watch" });
  const other = subjects(h.config.nats.subjectPrefix, h.config.run.id, 0);
  assert.match(h.subjects.demand, /\.shard\.1\.buffer\.demand$/);
  const elsewhere: Demand[] = [];
  bus.subscribe(other.demand, Demand, (d) => elsewhere.push(d));
  const producer = new TestProducer(h, "p", 0);
  try {
    await producer.join();
    assert.deepEqual(Object.keys(producer.demand!.freeRows), [HOOK], "the shard's demand speaks of its own pools");
    assert.deepEqual((await h.client.status({})).producers, ["p"]);
    const announce: MemberAnnounce = { producerId: "q", hookPoints: [OTHER], address: "", chunkRows: 64 };
    await assert.rejects(bus.request(other.hello, MemberAnnounce, announce, Demand, 1500), "nobody answers shard 0's hello");
    await producer.until((d) => d.command === "refill" && (d.grants.p ?? 0) > 0);
    assert.deepEqual(elsewhere, [], "nothing published on shard 0's subjects");
    assert.deepEqual((await h.client.status({})).producers, ["p"], "q never joined this shard");
  } finally {
    await producer.leave();
    await bus.drain();
  }
});

test("a shard ends once the trainers reading it are done; another shard's end and other trainers do not end it", async () => {
  h = await startHarness([...SHARD_SETS, "buffer.trainers=2"]);
  const bus = await connectBus({ url: h.nats.url, name: "watch" });
  const states: RunState[] = [];
  const demands: Demand[] = [];
  bus.subscribe(h.subjects.runState, RunState, (m) => states.push(m));
  bus.subscribe(h.subjects.demand, Demand, (m) => demands.push(m));
  try {
    const push = new PushClient(h.client);
    await push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: 0, contexts: [0], rowsPerContext: 8 }));
    // Shard 0 ending and trainer-0 (which trains OTHER only, see trainerHookPoints) being done are not this shard's business.
    bus.publish(h.subjects.runState, RunState, { state: "draining", reason: "shard 0's trainers are done", shard: 0 });
    bus.publish(h.subjects.trainerDone, TrainerDone, { trainerId: "trainer-0", hookPoints: [OTHER], step: 7 });
    await bus.flush();
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(h.running.status().state, ServiceState.RUNNING);
    // ...but its producers hear of it, in case they missed shard 0's word.
    assert.deepEqual(demands.at(-1)?.endedShards, [0]);
    bus.publish(h.subjects.trainerDone, TrainerDone, { trainerId: "trainer-1", hookPoints: [HOOK], step: 7 });
    await h.running.finished;
    assert.equal(h.running.buffer.stoppedBecause, "run_ended");
    for (const until = Date.now() + 5000; states.length < 3 && Date.now() < until;) await new Promise((r) => setTimeout(r, 50));
    assert.deepEqual(
      states.slice(1).map((m) => [m.state, m.reason, m.shard]),
      [
        ["draining", "every trainer reading buffer shard 1 is done", 1],
        ["stopped", "every trainer reading buffer shard 1 is done", 1],
      ],
    );
    push.cancel();
  } finally {
    await bus.drain();
  }
});

test("the trainers reading a shard are those whose hook points it holds", () => {
  const hooks = ["a", "b", "c", "d"];
  assert.equal(readersOf(hooks, 2, ["a"]), 1, "trainer 0 trains a and c");
  assert.equal(readersOf(hooks, 2, ["a", "b"]), 2);
  assert.equal(readersOf(hooks, 4, ["c", "d"]), 2);
  assert.equal(readersOf(hooks, 8, ["b"]), 2, "with more trainers than hook points, trainers 1 and 5 train b");
  assert.equal(readersOf(hooks, 0, ["a"]), 0);
});

/** A producer feeding both pools of one shard, as a plain NATS + gRPC client. */
async function bothPoolsProducer(harness: Harness) {
  const bus = await connectBus({ url: harness.nats.url, name: "p" });
  const announce: MemberAnnounce = { producerId: "p", hookPoints: [OTHER, HOOK], address: "", chunkRows: 64 };
  let demand = await bus.request(harness.subjects.hello, MemberAnnounce, announce, Demand, 5000);
  bus.subscribe(harness.subjects.demand, Demand, (d) => (demand = d));
  const heartbeat = setInterval(() => bus.publish(harness.subjects.heartbeat, MemberAnnounce, announce), 500);
  let context = 0;
  return {
    bus,
    announce,
    get demand() {
      return demand;
    },
    /** One chunk of one 64-row context to `hook`, on `stream`. */
    chunk: (stream: PushClient, hook: string) =>
      stream.send(
        makeChunk({ producerId: "p", producerNumber: 0, sequence: context, contexts: [context++], rowsPerContext: 64, hookPoint: hook }),
      ),
    close: async () => {
      clearInterval(heartbeat);
      await bus.drain();
    },
  };
}

test("a pool whose trainers are done stops gating its shard: its rows are refused as draining at once, the other pool is still granted; the shard ends with its last pool", async () => {
  // One shard holding both pools; trainer-0 trains OTHER, trainer-1 HOOK. A push never gives up waiting for room here.
  h = await startHarness([
    `buffer.hookPoints=[{name: ${OTHER}, dModel: ${D_MODEL}}, {name: ${HOOK}, dModel: ${D_MODEL}}]`,
    `trainer.hookPoints=[${OTHER}, ${HOOK}]`,
    "buffer.trainers=2",
    "buffer.pushWaitMs=120000",
  ]);
  const harness = h;
  const p = await bothPoolsProducer(harness);
  const states: RunState[] = [];
  p.bus.subscribe(harness.subjects.runState, RunState, (m) => states.push(m));
  const toOther = new PushClient(harness.client);
  const toHook = new PushClient(harness.client);
  const pool = async (hook: string) => (await harness.client.status({})).hookPoints.find((x) => x.hookPoint === hook)!;
  const waitFor = async (ready: () => boolean, what: string) => {
    for (const until = Date.now() + 10_000; !ready(); await new Promise((r) => setTimeout(r, 20)))
      if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
  };
  try {
    // 16 passes fill both pools; trainer-1 then reads HOOK below its low watermark, while nobody reads OTHER.
    for (let i = 0; i < 16; i++) {
      assert.equal((await p.chunk(toOther, OTHER)).code, status.OK);
      assert.equal((await p.chunk(toHook, HOOK)).code, status.OK);
    }
    const reader = harness.client.batches({ hookPoint: HOOK, trainerId: "trainer-1", batchSize: 64 });
    let read = 0;
    for await (const batch of reader as AsyncIterable<BatchesResponse>) if ((read += batch.activations!.shape[0]!) >= 640) break;
    reader.cancel();
    await waitFor(() => p.demand.command === "refill" && p.demand.freeRows[HOOK]! >= 640, "HOOK to ask for rows");
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(p.demand.grants.p, 1024, "OTHER, full, is in the producer's pass: no credit, though HOOK has room");
    // A chunk for the full pool waits for room.
    const waiting = p.chunk(toOther, OTHER);
    await new Promise((r) => setTimeout(r, 300));

    p.bus.publish(harness.subjects.trainerDone, TrainerDone, { trainerId: "trainer-0", hookPoints: [OTHER], step: 9 });
    const started = performance.now();
    const answer = await waiting;
    assert.equal(answer.code, status.FAILED_PRECONDITION, "the waiting chunk is answered once OTHER is done");
    assert.ok(performance.now() - started < 10_000);
    assert.match(answer.message, /every trainer reading this pool is done/);
    await waitFor(() => (p.demand.grants.p ?? 0) >= 1024 + 640, "credit for HOOK once OTHER no longer gates");
    assert.equal(p.demand.command, "refill");
    const late = await p.chunk(toOther, OTHER);
    assert.equal(late.code, status.FAILED_PRECONDITION, "a late chunk for the done pool is refused at once");
    assert.equal(late.rowsDropped, 64);
    assert.equal((await p.chunk(toHook, HOOK)).code, status.OK, "the other pool of the shard still takes rows");
    assert.equal(harness.running.status().state, ServiceState.RUNNING, "the shard goes on while a pool is not done");

    const other = await pool(OTHER);
    assert.equal(Number(other.rowsIn), 1024);
    assert.equal(Number(other.unconsumedRows), 1024, "what the done pool holds stays held");
    assert.deepEqual(
      other.dropped.map((d) => [d.reason, Number(d.rows)]),
      [["draining", 128]],
    );
    assert.equal(Number((await pool(HOOK)).rowsIn), 1024 + 64);

    p.bus.publish(harness.subjects.trainerDone, TrainerDone, { trainerId: "trainer-1", hookPoints: [HOOK], step: 9 });
    await waitFor(() => states.some((m) => m.state === "draining"), "the shard's draining");
    // As a producer does: it leaves the shard that ended, which then stops.
    p.bus.publish(harness.subjects.leave, MemberAnnounce, p.announce);
    await harness.running.finished;
    assert.equal(harness.running.buffer.stoppedBecause, "run_ended");
    toOther.cancel();
    toHook.cancel();
  } finally {
    await p.close();
  }
});

test("who is done with a pool, and which other shards ended, are kept in buffer.stateFile: a restarted buffer does not wait for them again and still says so", async () => {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-done-"));
  try {
    const config = loadConfig({
      sets: [
        `buffer.hookPoints=[{name: ${OTHER}, dModel: ${D_MODEL}}, {name: ${HOOK}, dModel: ${D_MODEL}}]`,
        "buffer.capacityRows=64",
        `buffer.stateFile=${join(dir, "buffer.state.json")}`,
      ],
    });
    const open = () =>
      new ActivationBuffer({
        runId: config.run.id,
        seed: 0,
        config: config.buffer,
        stateFile: new BufferStateFile(config.buffer.stateFile, config.run.id),
      });
    const first = open();
    first.hooks.get(OTHER)!.doneReaders.add("trainer-0");
    assert.equal(first.otherShardEnded(3), true);
    assert.equal(first.otherShardEnded(3), false, "known already");
    first.commit();
    const again = open();
    assert.deepEqual([...again.hooks.get(OTHER)!.doneReaders], ["trainer-0"]);
    assert.deepEqual([...again.hooks.get(HOOK)!.doneReaders], []);
    assert.deepEqual(again.endedShards, [3]);
    first.close();
    again.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
