import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { createClient } from "../../services/common/grpc/adapter.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { type RunningProducer, startProducer } from "../../services/producer/producer.js";
import { startWorld, type World } from "../producer/harness.js";
import { fuzzControl, fuzzHealthAndReflection } from "./shared.js";
import { assertMemoryBounded, JS_ROUND_BOUND_MIB, type MemorySample, memory, RawClient, Rng, ROUNDS, Tally } from "./support.js";

/**
 * A real producer (tiny Llama, nats-server, a recording buffer) fed PER_RPC malformed messages on
 * each of its RPCs, health and reflection; it answers each by field, keeps producing what it was
 * granted, and its memory stays bounded (ROUNDS in support.ts).
 */

const PER_RPC = 1000;

describe("fuzz: producer", () => {
  let world: World;
  let producer: RunningProducer;
  let raw: RawClient;
  const rng = new Rng(1818);
  const tally = new Tally();
  let memoryBefore: MemorySample;
  const memoryAfterRound: MemorySample[] = [];

  before(async () => {
    world = await startWorld();
    producer = await startProducer(
      world.config({
        id: "fuzzed",
        dataset: ["builtin:corpus"],
        hookPoints: ["blocks.0.hook_resid_post"],
        contextLength: 16,
        batchContexts: 2,
      }),
      { address: "127.0.0.1:0", log: () => undefined },
    );
    raw = new RawClient(producer.address);
    await raw.unary("/saeflow.producer.v1.ProducerService/Status", new Uint8Array(0));
    memoryBefore = await memory();
  });
  after(async () => {
    raw.close();
    for (const line of tally.lines()) console.log(`fuzz producer: ${line}`);
    await producer.stop();
    await world.close();
  });

  for (const round of ROUNDS) {
    for (const method of ["Status", "Pause", "Resume"]) {
      it(`round ${round}: answers ${PER_RPC} malformed ${method} requests by field`, async () => {
        await fuzzControl(raw, ProducerService, method, false, PER_RPC, rng, tally);
      });
    }

    it(`round ${round}: answers ${PER_RPC} malformed messages to each Health and reflection RPC`, async () => {
      await fuzzHealthAndReflection(raw, "producer", ProducerService.typeName, PER_RPC, rng, tally);
    });

    it(`round ${round}: memory`, async () => {
      memoryAfterRound.push(await memory());
    });
  }

  it(`stays up, produces what it is granted, and keeps its memory within bounds (RSS, and JS heap under ${JS_ROUND_BOUND_MIB} MiB over round 2)`, async () => {
    assertMemoryBounded("producer", memoryBefore, memoryAfterRound);
    const client = createClient(ProducerService, producer.address, world.config().transport);
    try {
      assert.equal((await client.resume({})).state, ServiceState.RUNNING);
      await world.demand.grant({ fuzzed: 64 });
      await world.buffer.until(() => world.buffer.chunks().length > 0, "a chunk after the fuzz");
      assert.ok((await client.status({})).rowsSent > 0n);
    } finally {
      client.close();
    }
  });
});
