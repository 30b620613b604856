import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { ledgerOf } from "../../tools/cli/ledger.js";
import { StatusResponseSchema as BufferStatusSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { StatusResponseSchema as ProducerStatusSchema } from "../../services/gen/saeflow/producer/v1/producer_pb.js";

// A shard that ends between two chunks of a pass gets the first and not the second, so one producer's
// hook points on one shard can be sent different row counts (the sharded e2e run met it once in CI,
// when its ledger used one count for every hook point of the shard).
describe("the run's row ledger", () => {
  it("takes each hook point's produced rows from its own count, where one shard's hook points were sent different rows", () => {
    const pool = (hookPoint: string, rowsIn: number, draining: number) => ({
      hookPoint,
      rowsIn: BigInt(rowsIn),
      rowsOut: BigInt(rowsIn),
      dropped: draining ? [{ reason: "draining", rows: BigInt(draining) }] : [],
    });
    const buffer = create(BufferStatusSchema, { shard: 0, hookPoints: [pool("a", 1000, 500), pool("b", 1000, 0)] });
    const producer = (id: string, a: number, b: number) =>
      create(ProducerStatusSchema, {
        producerId: id,
        feeds: [{ shard: 0, hookPoints: ["a", "b"], rowsSent: { a: BigInt(a), b: BigInt(b) } }],
      });
    // producer-0's last pass: a's chunk went out (refused: draining), b's did not (the shard had ended).
    const ledger = ledgerOf({
      at: 0,
      buffer: [{ id: "buffer-0", status: buffer }],
      producers: [
        { id: "producer-0", status: producer("producer-0", 1000, 500) },
        { id: "producer-1", status: producer("producer-1", 500, 500) },
      ],
      trainers: [],
    });
    assert.deepEqual(
      ledger.map((l) => [l.hookPoint, l.produced, l.producedReconciles, l.acceptedReconciles]),
      [
        ["a", 1500, true, true],
        ["b", 1000, true, true],
      ],
    );
  });
});
