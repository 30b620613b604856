import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import {
  BatchesRequestSchema,
  BufferService,
  PushRequestSchema,
  PushResponseSchema,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { collectBatches, D_MODEL, type Harness, HOOK, hookStatus, makeChunk, PushClient, startHarness } from "../buffer/support.js";
import { encodePush, hostileBatches, hostileChunks } from "./hostile.js";
import { fuzzControl, fuzzHealthAndReflection } from "./shared.js";
import {
  assertMalformedAnswer,
  assertMemoryBounded,
  inParallel,
  malformed,
  namesAField,
  pathOf,
  JS_ROUND_BOUND_MIB,
  type MemorySample,
  memory,
  RawClient,
  Rng,
  ROUNDS,
  Tally,
} from "./support.js";

/**
 * A real buffer on loopback fed malformed messages, PER_RPC per RPC in each of two rounds: bytes
 * that do not parse, and well-formed requests with hostile values. Each is answered with a status
 * (or, for a chunk, an answer) naming the field; the process serves normal calls afterwards; the
 * rows it holds and its ledger are what the legitimate pushes made them; memory stays bounded
 * (see ROUNDS in support.ts).
 */

const PER_RPC = 1000;
const CAPACITY = 1024;

describe("fuzz: buffer", () => {
  let h: Harness;
  let raw: RawClient;
  const rng = new Rng(18);
  const tally = new Tally();
  let memoryBefore: MemorySample;
  const accepted = makeChunk({ producerId: "p", producerNumber: 0, sequence: 0, contexts: [0], rowsPerContext: 64 });
  let fuzzContext = 0;
  /** Rows the hostile chunks may add to the ledger, by reason: none to rows_in. */
  const expectedDrops = { duplicate: 0, non_finite: 0 };

  before(async () => {
    h = await startHarness([`buffer.capacityRows=${CAPACITY}`]);
    raw = new RawClient(h.running.address);
    // Fill the pool once (16 chunks of 64 rows), so it is primed and full: nothing the fuzz does may change it.
    const push = new PushClient(h.client);
    for (let s = 0; s < CAPACITY / 64; s++) {
      const answer = await push.send(
        s === 0 ? accepted : makeChunk({ producerId: "p", producerNumber: 0, sequence: s, contexts: [s], rowsPerContext: 64 }),
      );
      assert.equal(answer.code, status.OK);
    }
    await push.end();
    // Warm-up: the first calls of each kind allocate what every later call reuses.
    await raw.unary(pathOf(BufferService, "Status"), new Uint8Array(0));
    await raw.bidi(pathOf(BufferService, "Push"), [new Uint8Array([0xff])]);
    memoryBefore = await memory();
  });
  const memoryAfterRound: MemorySample[] = [];
  after(async () => {
    raw.close();
    for (const line of tally.lines()) console.log(`fuzz buffer: ${line}`);
    await h.close();
  });

  /** The pool and ledger as the legitimate pushes left them. */
  async function assertUntouched(): Promise<void> {
    const s = await hookStatus(h);
    assert.equal(s.rowsIn, BigInt(CAPACITY), "no row of a refused chunk was accepted");
    assert.equal(s.unconsumedRows, BigInt(CAPACITY));
    const dropped = Object.fromEntries(s.dropped.map((d) => [d.reason, Number(d.rows)]));
    for (const [reason, rows] of Object.entries(dropped)) {
      assert.equal(rows, expectedDrops[reason as keyof typeof expectedDrops] ?? 0, `rows dropped as ${reason}`);
    }
  }

  for (const round of ROUNDS) {
    it(`round ${round}: answers ${PER_RPC} malformed Push messages each by field, and pools none of their rows`, async () => {
      const rpc = "BufferService/Push";
      const path = pathOf(BufferService, "Push");
      // Bytes that do not parse end their stream: one stream each.
      const bad = malformed(PushRequestSchema, accepted, PER_RPC / 2, rng);
      await inParallel(bad, 16, async (m) => {
        const answer = await raw.bidi(path, [m.bytes]);
        assertMalformedAnswer(answer, m, rpc);
        tally.add(rpc, answer.code);
      });
      // Well-formed hostile chunks are answered one by one on a stream that stays open; another run's ends it.
      let sent = bad.length;
      while (sent < PER_RPC) {
        const chunks = hostileChunks(HOOK, D_MODEL, rng, (rows) => Array.from({ length: rows }, () => fuzzContext++), accepted);
        const onStream = chunks.filter((c) => c.outcome !== "stream");
        const answer = await raw.bidi(
          path,
          onStream.map((c) => encodePush(c.request)),
        );
        assert.equal(answer.code, status.OK, answer.details);
        assert.equal(answer.messages.length, onStream.length, "one answer per chunk");
        answer.messages.forEach((bytes, i) => {
          const c = onStream[i]!;
          const res = fromBinary(PushResponseSchema, bytes);
          assert.equal(res.rowsAccepted, 0, `${c.what}: accepted rows`);
          if (c.outcome === "duplicate") {
            assert.deepEqual([res.code, res.rowsDropped], [status.OK, c.rows], c.what);
            expectedDrops.duplicate += c.rows;
            tally.add(rpc, "answer OK (duplicate, dropped)");
            return;
          }
          const code = c.field === "chunk.producer_id" && res.code === status.RESOURCE_EXHAUSTED ? res.code : status.INVALID_ARGUMENT;
          assert.equal(res.code, code, `${c.what}: ${JSON.stringify({ ...res, freeRows: 0, sequence: String(res.sequence) })}`);
          assert.ok(namesAField(res.message, c.field), `${c.what}: "${res.message.slice(0, 200)}" does not name ${c.field}`);
          assert.ok(res.message.length < 2048, `${c.what}: an answer of ${res.message.length} characters`);
          if (c.outcome === "non_finite") expectedDrops.non_finite += c.rows;
          tally.add(rpc, `answer ${status[res.code]}`);
        });
        for (const c of chunks.filter((x) => x.outcome === "stream")) {
          const ended = await raw.bidi(path, [encodePush(c.request)]);
          assert.equal(ended.code, status.FAILED_PRECONDITION, ended.details.slice(0, 200));
          assert.ok(namesAField(ended.details, "chunk.run_id"), ended.details.slice(0, 200));
          assert.ok(ended.details.length <= 1100, "a status detail quoting a 1 MiB run id is cut short");
          tally.add(rpc, ended.code);
        }
        sent += chunks.length;
      }
      await assertUntouched();
    });

    it(`round ${round}: refuses ${PER_RPC} malformed Batches requests by field`, async () => {
      const rpc = "BufferService/Batches";
      const path = pathOf(BufferService, "Batches");
      const bad = malformed(BatchesRequestSchema, { hookPoint: HOOK, trainerId: "t", batchSize: 8, maxBatches: 1n }, PER_RPC / 2, rng);
      await inParallel(bad, 16, async (m) => {
        const answer = await raw.serverStream(path, m.bytes);
        assertMalformedAnswer(answer, m, rpc);
        tally.add(rpc, answer.code);
      });
      const hostile: Array<{ bytes: Uint8Array; field: string }> = [];
      while (bad.length + hostile.length < PER_RPC) {
        for (const b of hostileBatches(HOOK, CAPACITY, rng))
          hostile.push({ bytes: toBinary(BatchesRequestSchema, create(BatchesRequestSchema, b.request)), field: b.field });
      }
      await inParallel(hostile, 16, async ({ bytes, field }) => {
        const answer = await raw.serverStream(path, bytes);
        assert.equal(answer.code, status.INVALID_ARGUMENT, answer.details.slice(0, 200));
        assert.ok(namesAField(answer.details, field), `"${answer.details.slice(0, 200)}" does not name ${field}`);
        assert.equal(answer.messages.length, 0);
        tally.add(rpc, answer.code);
      });
      assert.equal((await hookStatus(h)).trainers.length, 0, "no refused stream holds a cursor");
    });

    for (const method of ["Status", "Pause", "Resume", "Drain"]) {
      it(`round ${round}: answers ${PER_RPC} malformed ${method} requests by field${method === "Drain" ? " (and never drains)" : ""}`, async () => {
        await fuzzControl(raw, BufferService, method, method === "Drain", PER_RPC, rng, tally);
        await h.client.resume({});
        assert.equal((await h.client.status({})).state, ServiceState.RUNNING);
      });
    }

    it(`round ${round}: answers ${PER_RPC} malformed messages to each Health and reflection RPC`, async () => {
      await fuzzHealthAndReflection(raw, "buffer", BufferService.typeName, PER_RPC, rng, tally);
    });

    it(`round ${round}: memory`, async () => {
      memoryAfterRound.push(await memory());
    });
  }

  it(`stays up, pools what it pooled, and keeps its memory within bounds (RSS, and JS heap under ${JS_ROUND_BOUND_MIB} MiB over round 2)`, async () => {
    await assertUntouched();
    assertMemoryBounded("buffer", memoryBefore, memoryAfterRound);
    // Normal calls: a batch from the full pool, then a chunk into the room it left.
    const batches = await collectBatches(h.client, { trainerId: "after", batchSize: 64, maxBatches: 1n });
    assert.equal(batches.length, 1);
    const push = new PushClient(h.client);
    const answer = await push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: 100, contexts: [100], rowsPerContext: 64 }));
    await push.end();
    assert.deepEqual([answer.code, answer.rowsAccepted], [status.OK, 64]);
    assert.equal((await hookStatus(h)).rowsIn, BigInt(CAPACITY + 64));
  });
});
