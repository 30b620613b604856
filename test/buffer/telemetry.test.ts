import assert from "node:assert/strict";
import { test } from "node:test";
import { metrics, trace } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { AggregationTemporality, MeterProvider, MetricReader } from "@opentelemetry/sdk-metrics";
import { InMemorySpanExporter, NodeTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-node";
import { traceparentOf } from "../../services/common/telemetry.js";
import { collectBatches, HOOK, makeChunk, PushClient, startHarness } from "./support.js";

/** Collects on demand, as the OTLP exporter would every interval. */
class ManualReader extends MetricReader {
  constructor() {
    super({ aggregationTemporalitySelector: () => AggregationTemporality.CUMULATIVE });
  }
  protected override async onShutdown(): Promise<void> {}
  protected override async onForceFlush(): Promise<void> {}
}

test("push, shuffle, refill cycle and batch spans link producer to trainer; fill and wait are metrics", async () => {
  const spans = new InMemorySpanExporter();
  const tracing = new NodeTracerProvider({ spanProcessors: [new SimpleSpanProcessor(spans)] });
  tracing.register({ propagator: new W3CTraceContextPropagator() });
  const reader = new ManualReader();
  metrics.setGlobalMeterProvider(new MeterProvider({ readers: [reader] }));
  const h = await startHarness();
  try {
    const trainer = collectBatches(h.client, { trainerId: "t", batchSize: 256, maxBatches: 1n });
    const producer = trace.getTracer("test.producer");
    const push = new PushClient(h.client);
    const made: string[] = [];
    for (let i = 0; i < 16; i++) {
      const span = producer.startSpan("producer.chunk");
      const request = makeChunk({ producerId: "p", producerNumber: 0, sequence: i, contexts: [i], rowsPerContext: 64 });
      request.chunk!.traceparent = traceparentOf(span);
      span.end();
      made.push(span.spanContext().spanId);
      assert.equal((await push.send(request)).code, 0);
    }
    const [batch] = await trainer;

    const finished = spans.getFinishedSpans();
    const named = (name: string) => finished.filter((s) => s.name === name);
    const pushes = named("buffer.push");
    assert.equal(pushes.length, 16);
    assert.deepEqual(
      pushes.map((s) => s.parentSpanContext?.spanId).sort(),
      [...made].sort(),
      "each push span is a child of the producer span that made its chunk",
    );
    assert.ok(pushes.every((s) => s.attributes.rows === 64 && s.attributes.bytes === 64 * 16 * 4));
    assert.ok(named("buffer.shuffle").every((s) => s.attributes.rows === 64));
    const [cycle] = named("buffer.refill_cycle");
    assert.ok(cycle, "the first fill ended, so its span did");
    assert.equal(cycle.attributes.rows_added, 1024);
    assert.deepEqual(cycle.links.map((l) => l.context.spanId).sort(), [...made].sort(), "the refill cycle links the chunks that filled it");
    const [served] = named("buffer.batch");
    assert.equal(served!.attributes.rows, 256);
    assert.equal(served!.attributes.bytes, 256 * 16 * 4);
    assert.equal(served!.links[0]!.context.spanId, cycle.spanContext().spanId);
    const { traceId, spanId } = cycle.spanContext();
    assert.equal(batch!.traceparent, `00-${traceId}-${spanId}-01`, "the batch names the refill cycle its rows came from");

    const { resourceMetrics } = await reader.collect();
    const all = resourceMetrics.scopeMetrics.flatMap((s) => s.metrics);
    const point = (name: string) => all.find((m) => m.descriptor.name === name)?.dataPoints.find((p) => p.attributes.hook_point === HOOK);
    assert.equal(point("saeflow.buffer.fill_fraction")?.value, 0.75);
    assert.ok(Number(point("saeflow.buffer.trainer_wait")?.value) > 0, "the trainer waited for the first fill");
    assert.equal(point("saeflow.buffer.rows_in")?.value, 1024);
    assert.equal(point("saeflow.buffer.rows_out")?.value, 256);
  } finally {
    await h.close();
    await tracing.shutdown();
  }
});
