import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { context, trace } from "@opentelemetry/api";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { createClient, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { startTelemetry, type Telemetry } from "../../services/common/telemetry.js";
import { checkTensor, fromTensor, toTensor } from "../../services/common/tensor-codec.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { BatchesResponseSchema, BufferService, PushResponseSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

// The adapter end to end on loopback: typed streams both ways, statuses naming fields, message
// limits, health and trace context.
const transport = { ...RunConfigSchema.parse({}).transport, maxMessageBytes: 8 << 20 };
const D = 16;

describe("gRPC adapter", () => {
  let server: RunningServer;
  let client: ServiceClient<typeof BufferService>;
  let telemetry: Telemetry;
  const seenTraceIds: string[] = [];

  before(async () => {
    telemetry = startTelemetry({ serviceName: "grpc-test", endpoint: "", metricsIntervalMs: 1000 });
    server = await startServer("127.0.0.1:0", transport, [
      bind(BufferService, {
        push: async function* (requests) {
          for await (const req of requests) {
            try {
              const rows = checkTensor(req.chunk?.activations, "chunk.activations", { dtype: DType.FP32, shape: [undefined, D] }) / D;
              yield create(PushResponseSchema, { sequence: req.chunk!.sequence, rowsAccepted: rows });
            } catch (err) {
              yield create(PushResponseSchema, {
                sequence: req.chunk?.sequence ?? 0n,
                code: status.INVALID_ARGUMENT,
                message: (err as Error).message,
              });
            }
          }
        },
        batches: async function* (req) {
          if (req.batchSize === 0) throw new FieldError("batch_size", "must be at least 1");
          for (let i = 0n; i < req.maxBatches; i++) {
            const values = new Float32Array(req.batchSize * D).fill(Number(i));
            yield create(BatchesResponseSchema, { sequence: i, activations: toTensor(values, DType.FP32, [req.batchSize, D]) });
          }
        },
        status: async () => {
          seenTraceIds.push(trace.getSpanContext(context.active())?.traceId ?? "");
          return { runId: "r" };
        },
        pause: async () => {
          throw new Error("boom");
        },
        resume: async () => ({}),
        drain: async () => ({}),
      }),
    ]);
    client = createClient(BufferService, server.address, transport);
  });
  after(async () => {
    client.close();
    await server.close();
    await telemetry.shutdown();
  });

  it("streams pushes with per-chunk answers; a bad chunk is refused by field and the stream goes on", async () => {
    const call = client.push();
    const answers: Array<{ code: number; message: string; rows: number }> = [];
    const done = new Promise<void>((resolve, reject) => {
      call.on("data", (r: { code: number; message: string; rowsAccepted: number }) =>
        answers.push({ code: r.code, message: r.message, rows: r.rowsAccepted }),
      );
      call.on("end", resolve);
      call.on("error", reject);
    });
    call.write(
      create(BufferService.method.push.input, {
        chunk: { sequence: 0n, activations: toTensor(new Float32Array(3 * D), DType.FP32, [3, D]) },
      }),
    );
    call.write(
      create(BufferService.method.push.input, {
        chunk: { sequence: 1n, activations: toTensor(new Float32Array(3 * 8), DType.FP32, [3, 8]) },
      }),
    );
    call.write(
      create(BufferService.method.push.input, {
        chunk: { sequence: 2n, activations: toTensor(new Float32Array(2 * D), DType.FP32, [2, D]) },
      }),
    );
    call.end();
    await done;
    assert.deepEqual(
      answers.map((a) => [a.code, a.rows]),
      [
        [status.OK, 3],
        [status.INVALID_ARGUMENT, 0],
        [status.OK, 2],
      ],
    );
    assert.match(answers[1]!.message, /^chunk\.activations\.shape: dimension 1 is 8, expected 16/);
  });

  it("serves a server stream of tensors in order", async () => {
    const got: number[] = [];
    for await (const b of client.batches({ batchSize: 4, maxBatches: 5n })) {
      const t = b.activations!;
      checkTensor(t, "activations", { shape: [4, D] });
      got.push(fromTensor(t)[0]!);
    }
    assert.deepEqual(got, [0, 1, 2, 3, 4]);
  });

  it("ends a stream whose handler refuses the request with a status naming the field", async () => {
    const stream = client.batches({ batchSize: 0, maxBatches: 1n });
    await assert.rejects(
      (async () => {
        for await (const _ of stream) assert.fail("no batch expected");
      })(),
      (err: { code: number; details: string }) => err.code === status.INVALID_ARGUMENT && err.details === "batch_size: must be at least 1",
    );
  });

  it("refuses a message over the configured limit with RESOURCE_EXHAUSTED and keeps serving", async () => {
    const rows = Math.ceil((9 << 20) / (D * 4));
    await assert.rejects(
      new Promise((resolve, reject) => {
        const call = client.push();
        call.on("data", resolve);
        call.on("error", reject);
        call.write(
          create(BufferService.method.push.input, { chunk: { activations: toTensor(new Float32Array(rows * D), DType.FP32, [rows, D]) } }),
        );
      }),
      (err: { code: number }) => err.code === status.RESOURCE_EXHAUSTED,
    );
    assert.equal((await client.status({})).runId, "r");
  });

  it("answers a handler's unexpected error with INTERNAL and stays up", async () => {
    await assert.rejects(
      client.pause({}),
      (err: { code: number; details: string }) => err.code === status.INTERNAL && err.details === "boom",
    );
    assert.equal((await client.status({})).runId, "r");
  });

  it("carries the caller's trace context to the handler", async () => {
    const tracer = trace.getTracer("test");
    const traceId = await tracer.startActiveSpan("caller", async (span) => {
      await client.status({});
      span.end();
      return span.spanContext().traceId;
    });
    assert.match(traceId, /^[0-9a-f]{32}$/);
    assert.equal(seenTraceIds.at(-1), traceId);
  });

  it("serves grpc.health.v1: NOT_SERVING until the role says otherwise", async () => {
    const health = createClient(Health, server.address, transport);
    try {
      assert.equal((await health.check({ service: "saeflow.buffer.v1.BufferService" })).status, Serving.NOT_SERVING);
      server.health.set(Serving.SERVING);
      assert.equal((await health.check({ service: "saeflow.buffer.v1.BufferService" })).status, Serving.SERVING);
      assert.equal((await health.check({ service: "" })).status, Serving.SERVING);
      await assert.rejects(health.check({ service: "nope" }), (err: { code: number }) => err.code === status.NOT_FOUND);
    } finally {
      health.close();
    }
  });
});
