import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { InMemorySpanExporter, NodeTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-node";
import { startProducer } from "../../services/producer/producer.js";
import { paragraphs, startWorld, type World, writeDataset } from "./harness.js";

// Spans are checked with an in-memory exporter; this file has its own process, so the global
// tracer provider it registers touches no other test.
describe("producer telemetry", () => {
  const exporter = new InMemorySpanExporter();
  const provider = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] });
  let world: World;
  before(async () => {
    provider.register();
    world = await startWorld();
  });
  after(async () => {
    await world.close();
    await provider.shutdown();
  });

  it("records tokenize, forward, convert and push spans with tokens and bytes, and carries the forward span in each chunk", async () => {
    const data = writeDataset(world.dir, "t", { "a.txt": paragraphs(6) });
    const hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"];
    const p = await startProducer(
      world.config({ id: "traced", dataset: [data], hookPoints: hooks, contextLength: 16, batchContexts: 2, epochs: 1, excludeBos: false }),
      { address: "127.0.0.1:0", log: () => undefined },
    );
    await world.demand.grant({ traced: 1e12 });
    assert.equal(await p.finished, undefined);
    await p.stop();
    const spans = exporter.getFinishedSpans();
    const named = (n: string) => spans.filter((s) => s.name === n);
    const chunks = world.buffer.chunks(hooks[0]);
    for (const n of ["producer.produce", "producer.forward", "producer.convert", "producer.push"])
      assert.equal(named(n).length, chunks.length, n);
    assert.ok(named("producer.tokenize").length >= chunks.length);
    assert.ok(
      named("producer.tokenize").every((s) => s.attributes.input === "text"),
      "a dataset of text is tokenized",
    );
    const forward = named("producer.forward");
    const produce = named("producer.produce");
    assert.ok(
      forward.every((s, i) => s.parentSpanContext?.spanId === produce[i]!.spanContext().spanId),
      "forward runs inside produce",
    );
    assert.deepEqual(
      forward.map((s) => Number(s.attributes.tokens)),
      chunks.map((c) => c.tokenIds.length),
      "with BOS rows kept, every real token is a row",
    );
    const bytes = named("producer.push").map((s) => Number(s.attributes.bytes));
    assert.deepEqual(
      bytes,
      chunks.map((c) => 2 * c.activations!.data.byteLength),
    );
    assert.ok(named("producer.convert").every((s, i) => Number(s.attributes.bytes) === bytes[i]));
    for (const hook of hooks) {
      world.buffer.chunks(hook).forEach((c, i) => {
        const ctx = forward[i]!.spanContext();
        assert.equal(c.traceparent, `00-${ctx.traceId}-${ctx.spanId}-01`);
      });
    }
  });

  it("says when the stage read ids instead of tokenizing text", async () => {
    exporter.reset();
    const hook = "blocks.0.hook_resid_post";
    const before = world.buffer.chunks(hook).length;
    const ids = Array.from({ length: 40 }, (_, i) => 100 + i);
    const data = writeDataset(world.dir, "ids", { "a.jsonl": `${JSON.stringify({ input_ids: ids })}\n` });
    const p = await startProducer(
      world.config({
        id: "ids",
        dataset: [data],
        tokensField: "input_ids",
        hookPoints: [hook],
        contextLength: 16,
        batchContexts: 2,
        epochs: 1,
      }),
      { address: "127.0.0.1:0", log: () => undefined },
    );
    await world.demand.grant({ ids: 1e12 });
    assert.equal(await p.finished, undefined);
    await p.stop();
    const stage = exporter.getFinishedSpans().filter((s) => s.name === "producer.tokenize");
    const chunks = world.buffer.chunks(hook).length - before;
    assert.ok(chunks > 0 && stage.length >= chunks, `${stage.length} spans, ${chunks} chunks`);
    assert.ok(
      stage.every((s) => s.attributes.input === "ids"),
      JSON.stringify(stage.map((s) => s.attributes)),
    );
  });
});
