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
