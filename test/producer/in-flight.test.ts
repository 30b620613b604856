import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { freshPosition, PositionStore } from "../../services/producer/dataset/position.js";
import { InFlightLedger } from "../../services/producer/in-flight.js";
import { ActivationChunkSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";

// The producer's count of what it made, per hook point, that the run's ledger reconciles with what
// each buffer shard accepted and refused.
const dir = mkdtempSync(join(tmpdir(), "saeflow-in-flight-"));
after(() => rmSync(dir, { recursive: true, force: true }));

const chunk = (hookPoint: string, sequence: number, rows: number) =>
  create(ActivationChunkSchema, { hookPoint, sequence: BigInt(sequence), activations: { shape: [rows, 4] } });

describe("the in-flight ledger", () => {
  it("counts a chunk's rows once when it is re-sent after a broken stream, and none of a shard that ended before it went out", () => {
    const ledger = new InFlightLedger(new PositionStore(join(dir, "p.json"), "f"), freshPosition(), ["a", "b"]);
    const [a, b] = [chunk("a", 0, 64), chunk("b", 0, 64)];
    ledger.opened({ ...freshPosition(), contexts: 1, produced: { rows: 64, tokens: 65 } }, [a, b]);
    ledger.sending(a);
    // The stream to a's shard broke before the answer: a goes out again on the new stream.
    ledger.sending(a);
    ledger.answered(a);
    // b's shard ended before b was written.
    ledger.endHooks(["b"]);
    assert.deepEqual(ledger.delivered.produced.hooks, { a: 64, b: 0 });
  });
});

describe("the in-flight ledger when a shard ends with chunks unanswered", () => {
  const pass = (contexts: number) => ({ ...freshPosition(), contexts, produced: { rows: 64 * contexts, tokens: 65 * contexts } });

  it("counts a chunk written before its shard ended only once it is answered, and says no marks for that shard's hook points", () => {
    const ledger = new InFlightLedger(new PositionStore(join(dir, "q.json"), "f"), freshPosition(), ["a", "b"]);
    const [a0, b0, a1, b1] = [chunk("a", 0, 64), chunk("b", 0, 64), chunk("a", 1, 64), chunk("b", 1, 64)];
    ledger.opened(pass(1), [a0, b0]);
    ledger.opened(pass(2), [a1, b1]);
    for (const c of [a0, b0, a1, b1]) ledger.sending(c);
    ledger.answered(a0);
    ledger.answered(a1);
    // b's shard ends with b0 and b1 unanswered: the passes are delivered without them.
    ledger.endHooks(["b"]);
    assert.equal(ledger.delivered.contexts, 2);
    assert.deepEqual(ledger.delivered.produced.hooks, { a: 128, b: 0 });
    // A shard that ended (or a restart of it) is told nothing of b: the delivered contexts were not answered for b.
    assert.deepEqual(Object.keys(ledger.marks(["a", "b"])), ["a"]);
    // b0's answer still comes (the stream was up); b1's never does (it was down).
    ledger.answered(b0);
    assert.deepEqual(ledger.delivered.produced.hooks, { a: 128, b: 64 });
    assert.equal(ledger.unansweredLate, 1);
    // Kept at once: a restart makes nothing again for b.
    assert.deepEqual(new PositionStore(join(dir, "q.json"), "f").load()?.produced.hooks, { a: 128, b: 64 });
    // Passes delivered later keep what came late.
    const [a2] = [chunk("a", 2, 64)];
    ledger.opened(pass(3), [a2, chunk("b", 2, 64)]);
    ledger.sending(a2);
    ledger.answered(a2);
    assert.deepEqual(ledger.delivered.produced.hooks, { a: 192, b: 64 });
  });
});
