import assert from "node:assert/strict";
import { after, test } from "node:test";
import { status } from "@grpc/grpc-js";
import { type PushResponse, ShareMode } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import {
  attached,
  collectBatches,
  type Harness,
  HOOK,
  hookStatus,
  makeChunk,
  PushClient,
  rowsMatchIds,
  startHarness,
  TestProducer,
} from "./support.js";

let h: Harness | undefined;
const producers: TestProducer[] = [];
after(async () => {
  for (const p of producers) await p.leave();
  await h?.close();
});

/** A producer outside NATS: pushes regardless of demand, held back by gRPC flow control alone. */
async function rogue(push: PushClient, chunks: number): Promise<PushResponse[]> {
  const sends: Array<Promise<PushResponse>> = [];
  for (let i = 0; i < chunks; i++)
    sends.push(push.send(makeChunk({ producerId: "rogue", producerNumber: 9, sequence: i, contexts: [i], rowsPerContext: 64 })));
  sends.push(push.send(makeChunk({ producerId: "rogue", producerNumber: 9, sequence: 3, contexts: [3], rowsPerContext: 64 })));
  sends.push(
    push.send(makeChunk({ producerId: "rogue", producerNumber: 9, sequence: chunks, contexts: [chunks], rowsPerContext: 64, poison: 7 })),
  );
  sends.push(
    push.send(makeChunk({ producerId: "rogue", producerNumber: 9, sequence: chunks + 1, contexts: [0], rowsPerContext: 64, dModel: 8 })),
  );
  return Promise.all(sends);
}

const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0);

test("accounting reconciles after a run with several producers and trainers", async () => {
  h = await startHarness();
  const client = h.client;
  // Trainers attach first so that none misses a row: a split group of two and a fan-out probe.
  const split = ["s0", "s1"].map((id) => collectBatches(client, { trainerId: id, group: "split", share: ShareMode.SPLIT, batchSize: 48 }));
  const probe = collectBatches(client, { trainerId: "probe", group: "probe", share: ShareMode.FAN_OUT, batchSize: 100 });
  await attached(h, 3);

  for (const [i, id] of ["p0", "p1", "p2"].entries()) {
    const p = new TestProducer(h, id, i);
    producers.push(p);
    await p.join();
  }
  const push = new PushClient(client);
  const [rogueAnswers] = await Promise.all([rogue(push, 20), ...producers.map((p) => p.produce(20))]);
  await client.drain({});
  const late = await push.send(makeChunk({ producerId: "rogue", producerNumber: 9, sequence: 99, contexts: [99], rowsPerContext: 64 }));
  assert.equal(late.code, status.FAILED_PRECONDITION);
  const [s0, s1, all] = await Promise.all([...split, probe]);

  const answers = [...producers.flatMap((p) => p.answers), ...rogueAnswers!, late];
  const refused = answers.filter((a) => a.code === status.INVALID_ARGUMENT && a.rowsDropped === 0);
  assert.equal(refused.length, 1, "the malformed chunk is refused and not in the ledger");
  const accepted = sum(answers.map((a) => a.rowsAccepted));
  const droppedByClient = sum(answers.map((a) => a.rowsDropped));
  assert.equal(accepted, 3 * 20 * 64 + 20 * 64);

  const s = await hookStatus(h);
  assert.equal(s.state, ServiceState.STOPPED);
  assert.equal(s.rowsIn, BigInt(accepted));
  assert.deepEqual(
    s.dropped.map((d) => [d.reason, Number(d.rows)]),
    [
      ["duplicate", 64],
      ["non_finite", 64],
      ["draining", 64],
    ],
  );
  assert.equal(sum(s.dropped.map((d) => Number(d.rows))), droppedByClient);
  assert.equal(s.unconsumedRows, 0n);
  assert.equal(s.rowsOut, s.rowsIn, "rows accepted = rows served + rows held (0) + rows dropped (not pooled)");
  const balance = h.running.buffer.hooks.get(HOOK)!.accounting.balance(0);
  assert.ok(balance.reconciles);
  assert.equal(balance.received, accepted + droppedByClient);

  const splitIds = [...s0!, ...s1!].flatMap((b) => b.rowIds.map(Number));
  assert.equal(splitIds.length, accepted);
  assert.equal(new Set(splitIds).size, accepted, "the split group got every row once, between its two trainers");
  const probeIds = all!.flatMap((b) => b.rowIds.map(Number));
  assert.deepEqual(
    probeIds.sort((a, b) => a - b),
    splitIds.sort((a, b) => a - b),
    "the fan-out probe got the same rows",
  );
  assert.ok([...s0!, ...s1!, ...all!].every((b) => rowsMatchIds(b)));
});
