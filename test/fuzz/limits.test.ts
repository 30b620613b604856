import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { type ClientReadableStream, type ServiceError, status } from "@grpc/grpc-js";
import { loadConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { type BatchesResponse, BufferService, PushRequestSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { attached, type Harness, HOOK, hookStatus, makeChunk, PushClient, startHarness } from "../buffer/support.js";
import { namesAField, pathOf, RawClient } from "./support.js";

/**
 * The limits a buggy or hostile client cannot exceed (transport.limits), each against a real
 * server: streams per connection, producers and trainers per run, idle streams, and the deadline
 * every unary call carries.
 */

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Resolves with the status a stream ended with. */
function ended(call: { on(event: "error", f: (e: ServiceError) => void): unknown }): Promise<ServiceError> {
  return new Promise((resolve) => call.on("error", resolve));
}

describe("limits", () => {
  let h: Harness | undefined;
  const servers: RunningServer[] = [];
  afterEach(async () => {
    await h?.close();
    h = undefined;
    for (const s of servers.splice(0)) await s.close(0);
  });

  it("holds a connection to transport.limits.maxConcurrentStreams calls: the next waits for one to end", async () => {
    const transport = loadConfig({ sets: ["transport.limits.maxConcurrentStreams=4"] }).transport;
    const server = await startServer("127.0.0.1:0", transport, []);
    servers.push(server);
    const raw = new RawClient(server.address);
    const answered: number[] = [];
    const calls = Array.from({ length: 6 }, (_, i) => {
      const call = raw.client.makeServerStreamRequest(
        pathOf(Health, "Watch"),
        (b: Buffer) => b,
        (b: Buffer) => b,
        Buffer.alloc(0),
      );
      call.on("data", () => answered.push(i));
      call.on("error", () => undefined);
      return call;
    });
    await sleep(500);
    assert.deepEqual(answered, [0, 1, 2, 3], "four streams open on one connection, two waiting");
    calls[0]!.cancel();
    const deadline = Date.now() + 10_000;
    while (answered.length < 5 && Date.now() < deadline) await sleep(20);
    assert.deepEqual(answered, [0, 1, 2, 3, 4], "one ended, the next one opened");
    for (const c of calls) c.cancel();
    raw.close();
  });

  it("refuses a Push stream past transport.limits.producers, and a chunk from one producer id too many", async () => {
    h = await startHarness(["transport.limits.producers=64"]);
    const raw = new RawClient(h.running.address);
    const open = Array.from({ length: 64 }, () => new PushClient(h!.client));
    // Each stream is admitted when its first chunk reaches the server.
    const answers = await Promise.all(
      open.map((p, i) => p.send(makeChunk({ producerId: `p${i}`, producerNumber: i, sequence: 0, contexts: [0], rowsPerContext: 1 }))),
    );
    assert.ok(answers.every((a) => a.code === status.OK && a.rowsAccepted === 1));
    const refused = await raw.bidi(pathOf(BufferService, "Push"), [
      toBinary(
        PushRequestSchema,
        create(PushRequestSchema, makeChunk({ producerId: "p64", producerNumber: 64, sequence: 0, contexts: [0], rowsPerContext: 1 })),
      ),
    ]);
    assert.equal(refused.code, status.RESOURCE_EXHAUSTED);
    assert.ok(namesAField(refused.details, "transport.limits.producers"), refused.details);
    // 64 producer ids are known: a 65th on an open stream is refused by id, the stream goes on.
    const more = await open[0]!.send(makeChunk({ producerId: "p64", producerNumber: 64, sequence: 0, contexts: [0], rowsPerContext: 1 }));
    assert.equal(more.code, status.RESOURCE_EXHAUSTED);
    assert.match(more.message, /^chunk\.producer_id: "p64" would be producer 65 of this run; transport\.limits\.producers is 64$/);
    const known = await open[0]!.send(makeChunk({ producerId: "p0", producerNumber: 0, sequence: 1, contexts: [1], rowsPerContext: 1 }));
    assert.deepEqual([known.code, known.rowsAccepted], [status.OK, 1]);
    await Promise.all(open.map((p) => p.end()));
    assert.equal((await hookStatus(h)).rowsIn, 65n, "no row of a refused stream or chunk was pooled");
    raw.close();
  });

  it("refuses a Batches stream past transport.limits.trainers, and admits one once another ends", async () => {
    h = await startHarness(["transport.limits.trainers=3"]);
    const batches = (trainerId: string) => h!.client.batches({ hookPoint: HOOK, trainerId, batchSize: 8 });
    // The pool is not primed: these wait for rows, holding their places.
    const waiting = [0, 1, 2].map((i) => batches(`t${i}`));
    for (const w of waiting) w.on("error", () => undefined);
    await attached(h, 3);
    const fourth = batches("t3");
    const refusal = await ended(fourth);
    assert.equal(refusal.code, status.RESOURCE_EXHAUSTED);
    assert.ok(namesAField(refusal.details, "transport.limits.trainers"), refusal.details);
    waiting[0]!.cancel();
    const deadline = Date.now() + 10_000;
    while ((await hookStatus(h)).trainers.length > 2 && Date.now() < deadline) await sleep(20);
    const fifth = batches("t4");
    fifth.on("error", () => undefined);
    await attached(h, 3);
    for (const w of [...waiting, fifth]) w.cancel();
  });

  it("ends a Push stream whose producer sends nothing for transport.limits.idleStreamMs, never one waiting for room", async () => {
    h = await startHarness(["transport.limits.idleStreamMs=400", "buffer.pushWaitMs=1500"]);
    const chunk = (s: number) => makeChunk({ producerId: "s", producerNumber: 0, sequence: s, contexts: [s], rowsPerContext: 64 });
    const silent = new PushClient(h.client);
    assert.equal((await silent.send(chunk(0))).code, status.OK);
    const started = Date.now();
    await assert.rejects(silent.ended, (err: ServiceError) => {
      assert.equal(err.code, status.UNAVAILABLE);
      assert.match(err.details, /^stream idle: .* for 400 ms \(transport\.limits\.idleStreamMs\)/);
      return true;
    });
    assert.ok(Date.now() - started < 5000, "ended soon after the idle time");
    // The pool full (no trainer), a chunk waits pushWaitMs for room: the server's wait, answered, not cut.
    const push = new PushClient(h.client);
    for (let s = 1; s < 16; s++) assert.equal((await push.send(chunk(s))).code, status.OK);
    const waited = Date.now();
    const full = await push.send(chunk(16));
    assert.ok(Date.now() - waited >= 1400, "the chunk waited for room past the idle time");
    assert.equal(full.code, status.RESOURCE_EXHAUSTED, full.message);
    await push.end();
  });

  it("ends a Batches stream whose trainer reads nothing for transport.limits.idleStreamMs, never one waiting for rows", async () => {
    // Batches of 256 KiB (4096 rows of 16 fp32), 49 of them in a fill (16 MiB): the windows and buffers
    // on the way take the first few, then the server waits on a trainer that reads nothing.
    h = await startHarness(["transport.limits.idleStreamMs=400", "transport.flowControlWindowBytes=65535", "buffer.capacityRows=262144"]);
    const open = (trainerId: string) => {
      const call = h!.client.batches({ hookPoint: HOOK, trainerId, batchSize: 4096 }) as ClientReadableStream<BatchesResponse>;
      const end: { error?: ServiceError; batches: number } = { batches: 0 };
      call.on("data", () => end.batches++);
      call.on("error", (e: ServiceError) => (end.error = e));
      return { call, end };
    };
    const reader = open("reader");
    const stuck = open("stuck");
    stuck.call.pause();
    await attached(h, 2);
    await sleep(1000);
    assert.deepEqual([reader.end.error, stuck.end.error], [undefined, undefined], "waiting for rows is not idle");
    const push = new PushClient(h.client);
    for (let s = 0; s < 64; s++) {
      const chunk = makeChunk({ producerId: "s", producerNumber: 0, sequence: s, contexts: [s], rowsPerContext: 4096 });
      assert.equal((await push.send(chunk)).code, status.OK);
    }
    await push.end();
    const deadline = Date.now() + 10_000;
    while ((await hookStatus(h)).trainers.length > 1 && Date.now() < deadline) await sleep(50);
    const after = await hookStatus(h);
    assert.deepEqual(
      after.trainers.map((t) => t.trainerId),
      ["reader"],
      "the stuck trainer's stream is ended and its cursor closed",
    );
    assert.equal(after.state, ServiceState.RUNNING);
    // It learns why once it reads again.
    stuck.call.resume();
    while (stuck.end.error === undefined && Date.now() < deadline) await sleep(50);
    assert.equal(stuck.end.error?.code, status.UNAVAILABLE, String(stuck.end.error?.details));
    assert.match(stuck.end.error!.details, /transport\.limits\.idleStreamMs/);
    // The reader took the fill down to the mix floor (a quarter: 49 batches) and waits for the next: open past the idle time.
    await sleep(800);
    assert.deepEqual([reader.end.batches, reader.end.error], [(262144 - 65536) / 4096 + 1, undefined]);
    reader.call.cancel();
  });

  it("gives every unary call a deadline: transport.limits.callDeadlineMs when the caller sets none", async () => {
    const transport = loadConfig({ sets: ["transport.limits.callDeadlineMs=300"] }).transport;
    const hang = (): Promise<never> => new Promise(() => undefined);
    const server = await startServer("127.0.0.1:0", transport, [
      bind(TrainerService, { status: hang, checkpoint: hang, pause: hang, resume: hang, stop: hang }),
    ]);
    servers.push(server);
    const client = createClient(TrainerService, server.address, transport);
    const started = Date.now();
    await assert.rejects(client.status({}), (err: ServiceError) => err.code === status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - started < 5000);
    // The caller's own deadline wins.
    const own = Date.now();
    await assert.rejects(client.pause({}, { deadline: Date.now() + 1200 }), (err: ServiceError) => err.code === status.DEADLINE_EXCEEDED);
    assert.ok(Date.now() - own >= 1000, "the caller's longer deadline was kept");
    client.close();
  });
});
