import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { MemberAnnounce, RunState } from "../../services/common/coordination.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { connectBus } from "../../services/common/nats.js";
import { fp32ToBf16, fp32ToFp16, fromTensor } from "../../services/common/tensor-codec.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import type { ActivationChunk } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { openHookSession } from "../../services/producer/model/session.js";
import { type RunningProducer, startProducer } from "../../services/producer/producer.js";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import * as ort from "onnxruntime-node";
import { freePort } from "../../tools/cli/nats-server.js";
import { pretokenize, TOKENS_FIELD } from "../../tools/cli/pretokenize.js";
import { ReflectionClient } from "../support/reflection-client.js";
import { useSwiftShader } from "../trainer/webgpu.js";
import { D_MODEL, paragraphs, type RecordingBuffer, startWorld, type World, writeDataset } from "./harness.js";

// The producer against real parts: nats-server, a gRPC server speaking the buffer's Push contract,
// onnxruntime on the tiny Llama, the Llama-3.1 tokenizer.

// WebGPU runs on SwiftShader (Vulkan on the CPU), the same device on every machine.
useSwiftShader();

const BOS = 128000;
const HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"];
/** Role deps for an in-process producer: a control server on a free port, no log lines. */
const quiet = { address: "127.0.0.1:0", log: () => undefined };
const seqs = (chunks: ActivationChunk[]) => chunks.map((c) => Number(c.sequence));
/** Polls `ready` until it holds; rejects after a minute (a hang, not a slow machine). */
async function poll(ready: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!(await ready())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
/** Resolves true when nothing listens on 127.0.0.1:`port` any more (it can be bound again). */
function portIsFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
  });
}
const rowsOf = (chunks: ActivationChunk[]) => chunks.reduce((n, c) => n + c.activations!.shape[0]!, 0);

/** Runs a producer to the end of its shard with an unlimited grant; returns the chunks it sent, in order. */
async function runToEnd(world: World, producer: Record<string, unknown>, extra: Record<string, unknown> = {}): Promise<ActivationChunk[]> {
  const p = await startProducer(world.config({ epochs: 1, ...producer }, extra), quiet);
  await world.demand.grant({ [p.id]: 1e12 });
  assert.equal(await p.finished, undefined);
  await p.stop();
  return world.buffer.chunks().filter((c) => c.producerId === p.id);
}

describe("producer", () => {
  let world: World;
  let text: string;
  let data: string;
  before(async () => {
    world = await startWorld();
    text =
      paragraphs(12) +
      "\nA closing paragraph, longer than the others, so that one document spans two contexts of sixteen tokens at least.\n";
    data = writeDataset(world.dir, "fixed", { "doc.txt": text });
  });
  after(() => world.close());

  it("streams the activations of a direct ORT run of the same contexts, one forward pass for all hook points", async () => {
    await world.newBuffer();
    const chunks = await runToEnd(world, {
      id: "exact",
      dataset: [data],
      hookPoints: HOOKS,
      contextLength: 16,
      batchContexts: 3,
      excludeBos: false,
    });
    const byHook = HOOKS.map((h) => chunks.filter((c) => c.hookPoint === h));
    assert.deepEqual(seqs(byHook[0]!), seqs(byHook[1]!));
    assert.deepEqual(
      seqs(byHook[0]!),
      byHook[0]!.map((_, i) => i),
      "sequences count from 0 per hook point",
    );

    // The token stream is the text's paragraphs, cut into contexts of 16 that each start with BOS.
    const tokenizer = loadTokenizer("builtin:llama3_1");
    const paragraphs = text.split(/\n\s*\n/).filter((t) => t.trim());
    const expected = (await tokenizer.encode(paragraphs.map((t) => t.trim()))).flat();
    const first = byHook[0]!;
    assert.deepEqual(
      first.flatMap((c) => c.tokenIds).filter((t) => t !== BOS),
      expected,
    );
    assert.ok(
      first.every((c) => c.tokenIds.every((t, r) => c.contextIds[r] === c.contextIds[r - 1] || t === BOS)),
      "each context starts with BOS",
    );

    // Rebuild each context from its rows and run it alone through ORT: same activations.
    const session = await openHookSession(world.model.modelPath, HOOKS);
    for (const [h, hook] of HOOKS.entries()) {
      const rows = byHook[h]!.flatMap((c) => {
        const values = fromTensor(c.activations!) as Float32Array;
        return c.tokenIds.map((t, r) => ({
          t,
          ctx: c.contextIds[r]!,
          doc: c.documentIds[r]!,
          v: values.subarray(r * D_MODEL, (r + 1) * D_MODEL),
        }));
      });
      const contexts = [...new Set(rows.map((r) => r.ctx))];
      for (const id of contexts) {
        const mine = rows.filter((r) => r.ctx === id);
        assert.ok(mine.length <= 16);
        const ids = BigInt64Array.from(mine.map((r) => BigInt(r.t)));
        const dims = [1, mine.length];
        const out = await session.run({
          input_ids: new ort.Tensor("int64", ids, dims),
          attention_mask: new ort.Tensor("int64", new BigInt64Array(mine.length).fill(1n), dims),
          position_ids: new ort.Tensor("int64", BigInt64Array.from(mine.map((_, i) => BigInt(i))), dims),
        });
        const direct = out[hook]!.data as Float32Array;
        mine.forEach((r, p) => {
          for (let k = 0; k < D_MODEL; k++) {
            const want = direct[p * D_MODEL + k]!;
            assert.ok(
              Math.abs(r.v[k]! - want) <= 1e-5 * (1 + Math.abs(want)),
              `${hook} context ${id} position ${p}[${k}]: ${r.v[k]} vs ${want}`,
            );
          }
        });
      }
    }
    await session.release();
  });

  it("on WebGPU, with each pass on the model's thread, streams what the CPU provider streams", async () => {
    const settings = { dataset: [data], hookPoints: HOOKS, contextLength: 16, batchContexts: 3 };
    await world.newBuffer();
    const cpu = await runToEnd(world, { ...settings, id: "on-cpu" });
    await world.newBuffer();
    const gpu = await runToEnd(world, { ...settings, id: "on-webgpu", executionProvider: "webgpu" });
    assert.ok(cpu.length > 2, "several passes");
    assert.deepEqual(
      gpu.map((c) => [c.hookPoint, Number(c.sequence), c.tokenIds]),
      cpu.map((c) => [c.hookPoint, Number(c.sequence), c.tokenIds]),
      "the same chunks, in the same order",
    );
    let worst = 0;
    for (const [i, c] of cpu.entries()) {
      const want = fromTensor(c.activations!) as Float32Array;
      const got = fromTensor(gpu[i]!.activations!) as Float32Array;
      for (let k = 0; k < want.length; k++) worst = Math.max(worst, Math.abs(got[k]! - want[k]!) / (1 + Math.abs(want[k]!)));
    }
    assert.ok(worst < 1e-4, `WebGPU activations differ from the CPU's by ${worst}`);
  });

  it("drops BOS rows and converts once to fp16 or bf16 with the shared codec", async () => {
    await world.newBuffer();
    const base = { dataset: [data], hookPoints: [HOOKS[0]!], contextLength: 16, batchContexts: 3 };
    const full = await runToEnd(world, { ...base, id: "f32", excludeBos: false });
    const keptRows = full.flatMap((c) => {
      const v = fromTensor(c.activations!) as Float32Array;
      return c.tokenIds.flatMap((t, r) => (t === BOS ? [] : [v.subarray(r * D_MODEL, (r + 1) * D_MODEL)]));
    });
    for (const [dtype, convert] of [
      ["fp16", fp32ToFp16],
      ["bf16", fp32ToBf16],
    ] as const) {
      await world.newBuffer();
      const chunks = await runToEnd(world, { ...base, id: dtype, dtype }, { dtype });
      assert.ok(
        chunks.every((c) => !c.tokenIds.includes(BOS)),
        "no BOS row is sent",
      );
      const words = chunks.flatMap((c) => [...(fromTensor(c.activations!) as Uint16Array)]);
      assert.equal(words.length, keptRows.length * D_MODEL);
      keptRows.forEach((row, r) => row.forEach((x, k) => assert.equal(words[r * D_MODEL + k], convert(x), `${dtype} row ${r}[${k}]`)));
    }
  });

  it("two producers over one dataset cover each document exactly once", async () => {
    await world.newBuffer();
    const two = writeDataset(world.dir, "two", {
      "a.txt": paragraphs(9, 3),
      "b.jsonl": [0, 1, 2, 3, 4].map((i) => JSON.stringify({ text: `Record ${i} of the second file.` })).join("\n"),
    });
    const docs = [
      ...paragraphs(9, 3)
        .split("\n\n")
        .map((t) => t.trim()),
      ...[0, 1, 2, 3, 4].map((i) => `Record ${i} of the second file.`),
    ];
    const common = { dataset: [two], hookPoints: [HOOKS[0]!], contextLength: 24, batchContexts: 2, shardCount: 2, epochs: 1 };
    const producers = await Promise.all(
      [0, 1].map((i) => startProducer(world.config({ ...common, id: `cover-${i}`, shardIndex: i }), quiet)),
    );
    await world.demand.grant({ "cover-0": 1e12, "cover-1": 1e12 });
    assert.deepEqual(await Promise.all(producers.map((p) => p.finished)), [undefined, undefined]);
    await Promise.all(producers.map((p) => p.stop()));
    const tokenizer = loadTokenizer("builtin:llama3_1");
    const owner = new Map<number, string>();
    const tokensOf = new Map<number, number[]>();
    for (const c of world.buffer.chunks()) {
      c.documentIds.forEach((d, r) => {
        const prev = owner.get(d);
        assert.ok(prev === undefined || prev === c.producerId, `document ${d} sent by ${prev} and ${c.producerId}`);
        owner.set(d, c.producerId);
        tokensOf.set(d, [...(tokensOf.get(d) ?? []), c.tokenIds[r]!]);
      });
    }
    assert.deepEqual(
      [...owner.keys()].sort((a, b) => a - b),
      docs.map((_, i) => i),
    );
    const encoded = await tokenizer.encode(docs);
    docs.forEach((_, i) => assert.deepEqual(tokensOf.get(i), encoded[i], `document ${i} once, whole`));
    assert.deepEqual(new Set(owner.values()), new Set(["cover-0", "cover-1"]));
  });

  it("from its dataset pretokenized (saeflow pretokenize), streams exactly what it streams from the text", async () => {
    const dir = writeDataset(world.dir, "pretok", {
      "a.txt": paragraphs(7, 5),
      "b.jsonl": [0, 1, 2].map((i) => JSON.stringify({ text: `Record ${i}, written as JSON.` })).join("\n"),
    });
    const common = { hookPoints: [HOOKS[0]!], contextLength: 20, batchContexts: 2 };
    await world.newBuffer();
    const fromText = await runToEnd(world, { ...common, id: "text", dataset: [dir] });
    const jsonl = join(world.dir, "pretok.jsonl");
    const made = await pretokenize(world.config({ dataset: [dir] }).producer, jsonl, () => undefined);
    assert.equal(made.documents, 10);
    await world.newBuffer();
    const fromIds = await runToEnd(world, { ...common, id: "ids", dataset: [jsonl], tokensField: TOKENS_FIELD });
    assert.equal(fromIds.length, fromText.length);
    assert.equal(
      fromIds.reduce((n, c) => n + c.tokenIds.length, 0),
      made.tokens,
    );
    fromText.forEach((want, i) => {
      const got = fromIds[i]!;
      assert.deepEqual([got.tokenIds, got.contextIds, got.documentIds], [want.tokenIds, want.contextIds, want.documentIds], `chunk ${i}`);
      assert.deepEqual(fromTensor(got.activations!), fromTensor(want.activations!), `chunk ${i}'s activations`);
    });
  });

  it("produces only within its grant: whole passes first, then a smaller pass spends the credit left", async () => {
    await world.newBuffer();
    const p = await startProducer(
      world.config({ id: "granted", dataset: ["builtin:corpus"], hookPoints: HOOKS, contextLength: 32, batchContexts: 2, epochs: 0 }),
      quiet,
    );
    const perContext = 31; // a context of 32 with BOS left out: the most rows it can send
    const chunkRows = 2 * perContext;
    const grant = 3 * chunkRows - 10;
    await world.demand.grant({ granted: grant });
    await world.buffer.until(() => world.buffer.chunks(HOOKS[1]).length >= 3, "three passes");
    await poll(async () => p.status().state === ServiceState.PAUSED, "the producer to park on its grant");
    world.demand.bus.publish(world.demand.subjects.runState, RunState, { state: "draining", reason: "test" });
    assert.equal(await p.finished, undefined); // the run ending ends production
    await p.stop();
    for (const hook of HOOKS) {
      const chunks = world.buffer.chunks(hook);
      assert.deepEqual(seqs(chunks), [0, 1, 2], `${hook}: two whole passes, then one of the contexts that still fit`);
      assert.ok(chunks[2]!.activations!.shape[0]! <= chunkRows);
      assert.ok(rowsOf(chunks) <= grant, `${hook}: ${rowsOf(chunks)} rows sent past the grant of ${grant}`);
      assert.ok(rowsOf(chunks) + perContext > grant, `${hook}: parked while another context still fit`);
    }
    assert.equal(p.status().rowsSent, BigInt(2 * rowsOf(world.buffer.chunks(HOOKS[0]))));
  });

  it("pauses within one chunk on the buffer's pause, resumes on refill, and Status/Pause/Resume work over gRPC", async () => {
    const buffer: RecordingBuffer = await world.newBuffer();
    const p: RunningProducer = await startProducer(
      world.config({
        id: "pausing",
        dataset: ["builtin:corpus"],
        hookPoints: HOOKS,
        contextLength: 32,
        batchContexts: 2,
        maxInFlightChunks: 4,
      }),
      quiet,
    );
    const transport = world.config().transport;
    const control = createClient(ProducerService, p.address, transport);
    const health = createClient(Health, p.address, transport);
    assert.equal((await health.check({ service: "" })).status, Serving.SERVING);

    // The buffer stops answering at pass 3 and says pause; once the producer has heard it, answers resume.
    let pausedAt = -1;
    buffer.onChunk = (c) => {
      if (c.hookPoint === HOOKS[0] && c.sequence === 3n) {
        pausedAt = 3;
        buffer.holding = true;
        void world.demand.pause();
      }
    };
    await world.demand.grant({ pausing: 1e12 });
    await buffer.until(() => pausedAt === 3, "pass 3");
    await poll(async () => (await control.status({})).pausedByBuffer, "the producer to hear the pause");
    buffer.release();
    await poll(async () => (await control.status({})).state === ServiceState.PAUSED, "the producer to park");
    for (const hook of HOOKS)
      assert.ok(Math.max(...seqs(buffer.chunks(hook))) <= pausedAt + 1, `${hook}: at most the pass in flight after the pause`);
    const status = await control.status({});
    assert.deepEqual(status.hookPoints, HOOKS);
    assert.equal(status.executionProvider, "cpu");

    // What grpcurl sees through server reflection.
    const grpcurl = new ReflectionClient(p.address);
    assert.ok((await grpcurl.list()).includes("saeflow.producer.v1.ProducerService"));
    const json = (await grpcurl.call("saeflow.producer.v1.ProducerService", "Status", {})) as {
      producerId: string;
      state: string;
      position: { file: string };
    };
    assert.equal(json.producerId, "pausing");
    assert.equal(json.state, "SERVICE_STATE_PAUSED");
    assert.match(json.position.file, /\.md$/);
    grpcurl.close();

    // Refill: production goes on.
    buffer.onChunk = () => undefined;
    const before = buffer.chunks(HOOKS[0]).length;
    await world.demand.grant({ pausing: 1e12 }, 2);
    await buffer.until(() => buffer.chunks(HOOKS[0]).length > before + 2, "chunks after refill");
    assert.equal((await control.status({})).pausedByBuffer, false);

    // An operator's Pause closes the same gate: with answers held, pause, release; nothing more follows.
    buffer.holding = true;
    const holdFrom = Math.max(...seqs(buffer.chunks(HOOKS[0])));
    assert.equal((await control.pause({})).state, ServiceState.PAUSED);
    buffer.release();
    await poll(async () => (await control.status({})).state === ServiceState.PAUSED, "the producer to park");
    const parkedAt = Math.max(...seqs(buffer.chunks(HOOKS[1])));
    assert.ok(parkedAt <= holdFrom + 2, "the operator's pause stops within the passes in flight");
    assert.equal((await control.resume({})).state, ServiceState.RUNNING);
    await buffer.until(() => Math.max(...seqs(buffer.chunks(HOOKS[1]))) > parkedAt + 1, "chunks after Resume");
    await p.stop();
    const st = p.status();
    assert.ok(
      Number(st.tokens) > 0 &&
        Number(st.rowsSent) === rowsOf(buffer.chunks()) &&
        Number(st.bytesSent) === buffer.chunks().reduce((n, c) => n + c.activations!.data.byteLength, 0),
    );
    assert.ok(st.tokensPerSecond > 0);
    assert.equal(st.state, ServiceState.STOPPED);
    assert.ok(st.position!.contexts > 0n && st.position!.file.endsWith(".md"));
    control.close();
    health.close();
  });

  it("survives a buffer crash: reconnects, re-sends only what was not answered, rejoins the run", async () => {
    const first = await world.newBuffer();
    const joins: string[] = [];
    const sub = world.demand.bus.subscribe(world.demand.subjects.join, MemberAnnounce, (m) => joins.push(m.producerId));
    await world.demand.bus.flush();
    const p = await startProducer(
      world.config({
        id: "crashy",
        dataset: ["builtin:corpus"],
        hookPoints: HOOKS,
        contextLength: 32,
        batchContexts: 2,
        maxInFlightChunks: 4,
      }),
      quiet,
    );
    first.onChunk = (c) => {
      if (c.sequence === 2n && c.hookPoint === HOOKS[0]) first.holding = true;
    };
    await world.demand.grant({ crashy: 1e12 });
    await first.until(() => first.chunks(HOOKS[1]).some((c) => c.sequence === 3n), "passes 2 and 3 unanswered");
    const port = first.port;
    await first.crash();
    const second = await world.newBuffer(`127.0.0.1:${port}`);
    await second.until(() => second.chunks(HOOKS[0]).length >= 6, "production after the restart");
    await p.stop();
    sub.unsubscribe();
    for (const hook of HOOKS) {
      const after = seqs(second.chunks(hook));
      assert.equal(after[0], 2, `${hook}: re-sending starts at the first unanswered chunk`);
      assert.deepEqual(
        after,
        after.map((_, i) => i + 2),
        `${hook}: nothing answered is re-sent, nothing skipped`,
      );
    }
    assert.equal(second.duplicates.length, 0);
    assert.ok(joins.filter((j) => j === "crashy").length >= 2, "joined again after reconnecting");
  });

  it("joins a restarted buffer afresh even when nothing was in flight", async () => {
    const first = await world.newBuffer();
    const joins: string[] = [];
    const sub = world.demand.bus.subscribe(world.demand.subjects.join, MemberAnnounce, (m) => joins.push(m.producerId));
    await world.demand.bus.flush();
    const p = await startProducer(
      world.config({ id: "idle", dataset: ["builtin:corpus"], hookPoints: [HOOKS[0]!], contextLength: 32, batchContexts: 2 }),
      quiet,
    );
    const chunkRows = 2 * 31;
    await world.demand.grant({ idle: 2 * chunkRows });
    await first.until(() => first.chunks().length === 2, "two passes");
    await poll(async () => p.status().state === ServiceState.PAUSED, "the producer to park on its grant");
    const port = first.port;
    await first.crash();
    const second = await world.newBuffer(`127.0.0.1:${port}`);
    // The restarted buffer counts from the new join: the same absolute grant is worth two passes again.
    await second.until(() => second.chunks().length === 2, "two passes for the restarted buffer");
    await poll(async () => p.status().state === ServiceState.PAUSED, "the producer to park again");
    await p.stop();
    sub.unsubscribe();
    assert.deepEqual(seqs(second.chunks()), [2, 3]);
    assert.equal(joins.filter((j) => j === "idle").length, 2);
  });

  it("stops with the buffer's reason when the buffer refuses the stream for good", async () => {
    const buffer = await world.newBuffer();
    buffer.runId = "another-run";
    const p = await startProducer(
      world.config({ id: "refused", dataset: [data], hookPoints: [HOOKS[0]!], contextLength: 16, batchContexts: 2 }),
      quiet,
    );
    await world.demand.grant({ refused: 1e12 });
    assert.match(
      (await p.finished)?.message ?? "finished without an error",
      /refused the push stream: chunk\.run_id: "ptest" is not this buffer's run "another-run"/,
    );
    await p.stop();
    assert.equal(p.status().state, ServiceState.STOPPED);
  });

  it("a restarted producer resumes where it left off", async () => {
    await world.newBuffer();
    const two = writeDataset(world.dir, "resume", { "a.txt": paragraphs(20, 5), "b.txt": paragraphs(15, 6) });
    const common = { dataset: [two], hookPoints: [HOOKS[0]!], contextLength: 24, batchContexts: 2, epochs: 1 };
    const whole = await runToEnd(world, { ...common, id: "whole" });

    const a = await startProducer(world.config({ ...common, id: "resumer" }), quiet);
    await world.demand.grant({ resumer: 3 * 2 * 23 });
    await world.buffer.until(() => world.buffer.chunks().filter((c) => c.producerId === "resumer").length >= 3, "three passes");
    await a.stop();
    const saved = JSON.parse(readFileSync(join(world.dir, "run", "resumer.position.json"), "utf8")) as { position: { contexts: number } };
    assert.equal(saved.position.contexts, 2 * world.buffer.chunks().filter((c) => c.producerId === "resumer").length);
    const b = await startProducer(world.config({ ...common, id: "resumer" }), quiet);
    await world.demand.grant({ resumer: 1e12 }, 2);
    assert.equal(await b.finished, undefined);
    await b.stop();
    const resumed = world.buffer.chunks().filter((c) => c.producerId === "resumer");
    assert.deepEqual(
      seqs(resumed),
      resumed.map((_, i) => i),
      "sequences continue across the restart",
    );
    assert.deepEqual(
      resumed.flatMap((c) => c.tokenIds),
      whole.flatMap((c) => c.tokenIds),
    );
    assert.deepEqual(
      resumed.flatMap((c) => c.contextIds),
      whole.flatMap((c) => c.contextIds),
    );
    assert.deepEqual(
      resumed.flatMap((c) => c.documentIds),
      whole.flatMap((c) => c.documentIds),
    );
    assert.equal(world.buffer.duplicates.length, 0);
  });

  it("refuses a bad config at start, naming the key", async () => {
    const foreign = writeDataset(world.dir, "foreign", {
      "ids.jsonl": '{"input_ids":[1,2,3]}',
      "ids.jsonl.meta.json": JSON.stringify({
        field: "input_ids",
        tokenizer: { source: "other/tokenizer", fingerprint: "0000000000000000" },
      }),
    });
    const cases: Array<[Record<string, unknown>, string, RegExp]> = [
      [{ hookPoints: ["blocks.0.hook_resid_psot"] }, "producer.hookPoints", /unknown hook point "blocks\.0\.hook_resid_psot"/],
      [{ hookPoints: ["blocks.7.hook_resid_post"] }, "producer.hookPoints", /layer 7 is beyond the model, which has 2 layers/],
      [{ tokenizer: join(world.dir, "missing", "tokenizer.json") }, "producer.tokenizer", /missing\/tokenizer\.json does not exist/],
      [
        { model: join(world.dir, "nowhere.onnx") },
        "producer.model",
        /does not exist; make the tiny test model with `npx tsx tools\/model\/tiny-llama\.ts/,
      ],
      [{ dataset: [join(world.dir, "nope")] }, "producer.dataset.0", /does not exist/],
      [
        { hookPoints: ["blocks.0.hook_resid_post"], _pool: 32 },
        "producer.hookPoints.0",
        /is 64 wide in the model but its buffer pool has dModel 32/,
      ],
      [{ batchContexts: 8192, contextLength: 1024 }, "producer.batchContexts", /over transport\.maxMessageBytes/],
      [{ dataset: [foreign], tokensField: "input_ids" }, "producer.tokenizer", /was pretokenized with other\/tokenizer/],
    ];
    for (const [{ _pool, ...producer }, key, message] of cases) {
      // Pools for the producer's hook points, so that the config loads and the producer's own checks speak.
      const hooks = ((producer.hookPoints as string[] | undefined) ?? []).map((name) => ({ name, dModel: _pool ?? D_MODEL }));
      const buffer = { hookPoints: [...hooks, { name: "blocks.1.hook_resid_post", dModel: D_MODEL }] };
      await assert.rejects(
        startProducer(world.config({ dataset: [data], ...producer }, buffer), quiet),
        (err: Error & { keys?: string[] }) => {
          assert.ok(err.message.startsWith(`${key}: `), err.message);
          assert.match(err.message, message);
          assert.deepEqual(err.keys, [key]);
          return true;
        },
      );
    }
  });

  it("fails start naming nats.url when NATS cannot be reached, leaving nothing listening", async () => {
    const port = await freePort();
    const config = world.config({ id: "no-nats", dataset: [data], hookPoints: [HOOKS[0]!] });
    const unreachable = { ...config, nats: { ...config.nats, url: `nats://127.0.0.1:${await freePort()}` } };
    await assert.rejects(startProducer(unreachable, { ...quiet, address: `127.0.0.1:${port}` }), (err: Error) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.deepEqual(err.keys, ["nats.url"]);
      assert.match(err.message, /^nats\.url: cannot connect to nats:\/\/127\.0\.0\.1:\d+/);
      return true;
    });
    assert.ok(await portIsFree(port), "the control port is free again");
  });

  it("lets go of the control server when joining the run fails after it serves", async () => {
    const port = await freePort();
    const closed = await connectBus({ url: world.nats.url, name: "closed", log: () => undefined });
    await closed.drain();
    const config = world.config({ id: "no-join", dataset: [data], hookPoints: [HOOKS[0]!] });
    await assert.rejects(startProducer(config, { ...quiet, address: `127.0.0.1:${port}`, bus: closed }), /closed connection/);
    assert.ok(await portIsFree(port), "the control port is free again");
  });
});
