import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { createClient } from "../../services/common/grpc/adapter.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ArrayBatchSource } from "../../services/trainer/batches.js";
import { type RunningTrainer, startTrainer } from "../../services/trainer/trainer.js";
import { asBatches, sparseData, testConfig } from "../trainer/fixtures.js";
import { fuzzControl, fuzzHealthAndReflection } from "./shared.js";
import { assertMemoryBounded, JS_ROUND_BOUND_MIB, type MemorySample, memory, RawClient, Rng, ROUNDS, Tally } from "./support.js";

/**
 * A real trainer (in-memory batches, so it trains without a buffer) fed PER_RPC malformed messages on
 * each of its RPCs, health and reflection. Checkpoint and Stop act on any request that parses, so
 * they get only bytes that do not: no checkpoint is written and the trainer does not stop. It
 * answers each by field, checkpoints on a normal call afterwards, and its memory stays bounded (ROUNDS in support.ts).
 */

const PER_RPC = 1000;
const D = 16;
const BATCH = 32;

describe("fuzz: trainer", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-fuzz-trainer-"));
  const config = testConfig(
    root,
    {
      batchSize: BATCH,
      steps: 40,
      logEvery: 10,
      saes: [{ name: "s", width: 32, k: 4, lr: 0.01 }],
    },
    { dModel: D },
  );
  let trainer: RunningTrainer;
  let raw: RawClient;
  const rng = new Rng(181818);
  const tally = new Tally();
  let memoryBefore: MemorySample;
  const memoryAfterRound: MemorySample[] = [];

  before(async () => {
    const data = sparseData({ d: D, features: 24, active: 3, rows: BATCH, batches: 40, seed: "fuzz" });
    trainer = await startTrainer(config, {
      source: new ArrayBatchSource(asBatches(data.batches, BATCH, D)),
      address: "127.0.0.1:0",
      log: () => undefined,
    });
    assert.equal(await trainer.ready, true);
    raw = new RawClient(trainer.address);
    await raw.unary("/saeflow.trainer.v1.TrainerService/Status", new Uint8Array(0));
    memoryBefore = await memory();
  });
  after(async () => {
    raw.close();
    for (const line of tally.lines()) console.log(`fuzz trainer: ${line}`);
    await trainer.stop();
    rmSync(root, { recursive: true, force: true });
  });

  for (const round of ROUNDS) {
    for (const [method, acts] of [
      ["Status", false],
      ["Resume", false],
      ["Pause", false],
      ["Checkpoint", true],
      ["Stop", true],
    ] as const) {
      it(`round ${round}: answers ${PER_RPC} malformed ${method} requests by field${acts ? " (and never acts)" : ""}`, async () => {
        await fuzzControl(raw, TrainerService, method, acts, PER_RPC, rng, tally);
      });
    }

    it(`round ${round}: answers ${PER_RPC} malformed messages to each Health and reflection RPC`, async () => {
      await fuzzHealthAndReflection(raw, "trainer", TrainerService.typeName, PER_RPC, rng, tally);
    });

    it(`round ${round}: memory`, async () => {
      memoryAfterRound.push(await memory());
    });
  }

  it(`stays up, checkpoints on a normal call, and keeps its memory within bounds (RSS, and JS heap under ${JS_ROUND_BOUND_MIB} MiB over round 2)`, async () => {
    assertMemoryBounded("trainer", memoryBefore, memoryAfterRound);
    const client = createClient(TrainerService, trainer.address, config.transport);
    try {
      const checkpoint = await client.checkpoint({});
      assert.equal(checkpoint.paths.length, 1);
      const status = await client.status({});
      assert.equal(status.saes[0]!.step, checkpoint.step);
    } finally {
      client.close();
    }
  });
});
