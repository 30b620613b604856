import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { afterEach, test } from "node:test";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { freePort, startNatsServer } from "../../tools/cli/nats-server.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { BufferService, type BatchesResponse } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { ReflectionClient } from "../support/reflection-client.js";
import { attached, type Harness, HOOK, hookStatus, startHarness, TestProducer } from "./support.js";

let h: Harness | undefined;
let producer: TestProducer | undefined;
afterEach(async () => {
  await producer?.leave();
  producer = undefined;
  await h?.close();
  h = undefined;
});

test("pause holds trainers and tells producers to pause; resume undoes it", async () => {
  h = await startHarness();
  const p = (producer = new TestProducer(h, "p", 0));
  await p.join();
  await p.produce(16);
  assert.equal((await h.client.pause({})).state, ServiceState.PAUSED);
  await p.until((d) => d.command === "pause");
  const stream = h.client.batches({ hookPoint: HOOK, trainerId: "t", batchSize: 64, maxBatches: 9n });
  await attached(h, 1);
  let s = await hookStatus(h);
  assert.equal(s.state, ServiceState.PAUSED);
  assert.equal(s.trainers[0]!.batches, 0n);
  assert.equal(s.unconsumedRows, 1024n);

  assert.equal((await h.client.resume({})).state, ServiceState.RUNNING);
  const got: BatchesResponse[] = [];
  for await (const b of stream as AsyncIterable<BatchesResponse>) got.push(b);
  assert.equal(got.length, 9);
  s = await hookStatus(h);
  assert.equal(s.refilling, true);
  await p.until((d) => d.command === "refill");
  assert.ok(s.trainerWaitMs > 0, "time paused counts as trainer wait");
});

test("grpcurl-style JSON calls reach Status, Pause, Resume and Drain; health says SERVING", async () => {
  h = await startHarness();
  const health = createClient(Health, h.running.address, h.config.transport);
  assert.equal((await health.check({ service: "saeflow.buffer.v1.BufferService" })).status, Serving.SERVING);
  health.close();
  const grpcurl = new ReflectionClient(h.running.address);
  try {
    assert.ok((await grpcurl.list()).includes("saeflow.buffer.v1.BufferService"));
    const status = (await grpcurl.call("saeflow.buffer.v1.BufferService", "Status", {})) as {
      state: string;
      runId: string;
      hookPoints: Array<Record<string, unknown>>;
    };
    assert.equal(status.state, "SERVICE_STATE_RUNNING");
    assert.equal(status.runId, "test");
    assert.equal(status.hookPoints[0]!.hookPoint, HOOK);
    assert.equal(status.hookPoints[0]!.capacityRows, "1024");
    assert.equal(status.hookPoints[0]!.refilling, true);
    assert.deepEqual(await grpcurl.call("saeflow.buffer.v1.BufferService", "Pause", {}), { state: "SERVICE_STATE_PAUSED" });
    assert.deepEqual(await grpcurl.call("saeflow.buffer.v1.BufferService", "Resume", {}), { state: "SERVICE_STATE_RUNNING" });
    // An empty buffer is drained at once.
    assert.deepEqual(await grpcurl.call("saeflow.buffer.v1.BufferService", "Drain", {}), { state: "SERVICE_STATE_STOPPED" });
  } finally {
    grpcurl.close();
  }
});

test("main.ts serves from a config, and exits once drained", async () => {
  const nats = await startNatsServer();
  const port = await freePort();
  const child = spawn(
    process.execPath,
    [
      "--import",
      "tsx",
      "services/buffer/main.ts",
      "--set",
      `nats.url=${nats.url}`,
      "--set",
      `buffer.address=127.0.0.1:${port}`,
      "--set",
      "buffer.capacityRows=256",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
  let log = "";
  await new Promise<void>((resolve, reject) => {
    child.stderr!.on("data", (d: Buffer) => {
      log += d.toString();
      if (log.includes("buffer: serving")) resolve();
    });
    child.once("exit", () => reject(new Error(`buffer exited early:\n${log}`)));
  });
  const client = createClient(BufferService, `127.0.0.1:${port}`, RunConfigSchema.parse({}).transport);
  try {
    assert.match(log, /buffer: serving 127\.0\.0\.1:\d+ for run local: 1 pool\(s\) of 256 rows/);
    assert.equal((await client.status({})).state, ServiceState.RUNNING);
    await client.drain({});
    assert.equal(await exited, 0);
  } finally {
    client.close();
    child.kill();
    await nats.stop();
  }
});
