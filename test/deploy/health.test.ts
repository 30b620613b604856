import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { type ServiceError, status } from "@grpc/grpc-js";
import { loadConfig } from "../../services/common/config/index.js";
import { createClient, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { Health, type HealthCheckResponse } from "../../services/gen/grpc/health/v1/health_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";

/**
 * The chart's probes call grpc.health.v1 the way the kubelet does: startup and liveness ask for ""
 * (the whole server), readiness for the role's service name. A real server on loopback, built the
 * way every role builds its own, answers them.
 */

const transport = loadConfig().transport;
const ROLE = ProducerService.typeName;
let server: RunningServer;
let health: ServiceClient<typeof Health>;

before(async () => {
  // The role's own RPCs are never called here; the probes only see its health.
  const idle = async () => ({});
  server = await startServer("127.0.0.1:0", transport, [bind(ProducerService, { status: idle, pause: idle, resume: idle })]);
  health = createClient(Health, server.address, transport);
  await health.ready(10_000);
});

after(async () => {
  health.close();
  await server.close();
});

/** Opens a Watch; `next` yields its statuses in order, none lost between calls; `stop` cancels it. */
function watch(service: string): { next(): Promise<Serving>; stop(): Promise<void> } {
  const call = health.watch({ service });
  const queued: Serving[] = [];
  const waiting: Array<(s: Serving) => void> = [];
  call.on("data", (m: HealthCheckResponse) => {
    const waiter = waiting.shift();
    if (waiter) waiter(m.status);
    else queued.push(m.status);
  });
  const ended = new Promise<void>((resolve, reject) =>
    call.on("error", (err: ServiceError) => (err.code === status.CANCELLED ? resolve() : reject(err))),
  );
  return {
    next: () => (queued.length ? Promise.resolve(queued.shift()!) : new Promise((resolve) => waiting.push(resolve))),
    stop: async () => {
      call.cancel();
      await ended;
    },
  };
}

test("a server starts NOT_SERVING for '' and for the role's service, and names no other", async () => {
  assert.equal(ROLE, "saeflow.producer.v1.ProducerService");
  assert.equal((await health.check({ service: "" })).status, Serving.NOT_SERVING);
  assert.equal((await health.check({ service: ROLE })).status, Serving.NOT_SERVING);
  await assert.rejects(health.check({ service: "saeflow.buffer.v1.BufferService" }), (err: ServiceError) => {
    assert.equal(err.code, status.NOT_FOUND);
    assert.match(err.details, /service: unknown service "saeflow\.buffer\.v1\.BufferService"/);
    return true;
  });
  const listed = await health.list({});
  assert.deepEqual(Object.fromEntries(Object.entries(listed.statuses).map(([k, v]) => [k, v.status])), {
    "": Serving.NOT_SERVING,
    [ROLE]: Serving.NOT_SERVING,
  });
});

test("Watch sees NOT_SERVING turn to SERVING when the role becomes ready, on '' and on the role's name", async () => {
  const whole = watch("");
  const role = watch(ROLE);
  assert.equal(await whole.next(), Serving.NOT_SERVING);
  assert.equal(await role.next(), Serving.NOT_SERVING);
  const [wholeNext, roleNext] = [whole.next(), role.next()];
  server.health.set(Serving.SERVING);
  assert.equal(await wholeNext, Serving.SERVING);
  assert.equal(await roleNext, Serving.SERVING);
  assert.equal((await health.check({ service: "" })).status, Serving.SERVING);
  assert.equal((await health.check({ service: ROLE })).status, Serving.SERVING);
  await Promise.all([whole.stop(), role.stop()]);
});

test("the role's service can go NOT_SERVING alone: readiness drops while liveness on '' holds", async () => {
  server.health.set(Serving.SERVING);
  const role = watch(ROLE);
  assert.equal(await role.next(), Serving.SERVING);
  const next = role.next();
  server.health.set(Serving.NOT_SERVING, ROLE);
  assert.equal(await next, Serving.NOT_SERVING);
  assert.equal((await health.check({ service: "" })).status, Serving.SERVING);
  await role.stop();
});
