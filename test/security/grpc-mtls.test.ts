import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { type RunningBuffer, startBuffer } from "../../services/buffer/buffer.js";
import type { TransportConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import {
  ServerReflection,
  ServerReflectionRequestSchema,
  type ServerReflectionResponse,
} from "../../services/gen/grpc/reflection/v1/reflection_pb.js";
import { type BatchesResponse, BufferService, PushRequestSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import type { Issued } from "../../tools/cli/pki.js";
import { makeChunk, PushClient } from "../buffer/support.js";
import { as, HOOK, makeTestPki, plaintext, type TestPki, tlsConfig } from "./certs.js";

/**
 * A real buffer under mTLS on a loopback port, called with real certificates made by openssl: each
 * stranger is refused with the status that says why, each role may do its own work and no other's.
 */

interface Refusal {
  code: number;
  details: string;
}

const deadline = () => ({ deadline: Date.now() + 5000 });

async function refusal(call: Promise<unknown>): Promise<Refusal> {
  try {
    await call;
  } catch (err) {
    return err as Refusal;
  }
  assert.fail("the call was answered");
}

/** The status a bidi or server stream ends with. */
function streamEnd(stream: {
  on(event: "error", l: (e: Refusal) => void): unknown;
  on(event: "data", l: () => void): unknown;
}): Promise<Refusal> {
  return new Promise((resolve) => {
    stream.on("data", () => undefined);
    stream.on("error", resolve);
  });
}

describe("gRPC under mTLS, with real certificates", () => {
  let pki: TestPki;
  let buffer: RunningBuffer;
  let base: TransportConfig;
  const clients: Array<{ close(): void }> = [];
  const bufferAs = (who: Issued | undefined, transport?: TransportConfig) => {
    const client = createClient(BufferService, buffer.address, transport ?? as(base, who));
    clients.push(client);
    return client;
  };

  before(async () => {
    pki = makeTestPki();
    const config = tlsConfig(pki, pki.buffer, "mtls", ["transport.tls.healthAddress=127.0.0.1:0"]);
    base = config.transport;
    buffer = await startBuffer(config, { bus: null, address: "127.0.0.1:0", log: () => undefined });
  });
  after(async () => {
    for (const c of clients) c.close();
    await buffer.stop();
    pki.close();
  });

  it("refuses a plaintext client: it never gets a connection", async () => {
    const r = await refusal(bufferAs(undefined, plaintext(base)).status({}, deadline()));
    assert.equal(r.code, status.UNAVAILABLE, r.details);
  });

  it("answers a client without a certificate UNAUTHENTICATED, saying so", async () => {
    const r = await refusal(bufferAs(undefined).status({}, deadline()));
    assert.equal(r.code, status.UNAUTHENTICATED);
    assert.match(r.details, /^saeflow\.buffer\.v1\.BufferService\/Status refused: it presented no client certificate/);
  });

  it("answers a certificate from another CA UNAUTHENTICATED, even with the operator's name", async () => {
    const r = await refusal(bufferAs(pki.stranger).drain({}, deadline()));
    assert.equal(r.code, status.UNAUTHENTICATED);
    assert.match(r.details, /BufferService\/Drain refused: its client certificate is not signed by this server's CA/);
    assert.equal(buffer.status().state, ServiceState.RUNNING, "the stranger's Drain did nothing");
  });

  it("answers an expired certificate UNAUTHENTICATED, saying it expired", async () => {
    const r = await refusal(bufferAs(pki.expired).pause({}, deadline()));
    assert.equal(r.code, status.UNAUTHENTICATED);
    assert.match(r.details, /BufferService\/Pause refused: its client certificate has expired/);
  });

  it("refuses a producer's certificate calling Drain with PERMISSION_DENIED naming who may", async () => {
    const r = await refusal(bufferAs(pki.producer).drain({}, deadline()));
    assert.equal(r.code, status.PERMISSION_DENIED);
    assert.equal(
      r.details,
      "saeflow.buffer.v1.BufferService/Drain refused to saeflow-producer: only transport.tls.operators (saeflow-operator) may call it",
    );
    assert.equal(buffer.status().state, ServiceState.RUNNING);
  });

  it("lets only producers Push and only trainers open Batches", async () => {
    const trainerPush = bufferAs(pki.trainer).push();
    const pushRefused = streamEnd(trainerPush);
    trainerPush.write(
      create(PushRequestSchema, makeChunk({ producerId: "t", producerNumber: 9, sequence: 0, contexts: [0], rowsPerContext: 64 })),
    );
    const r = await pushRefused;
    assert.equal(r.code, status.PERMISSION_DENIED);
    assert.match(r.details, /BufferService\/Push refused to saeflow-trainer: only transport.tls.producers \(saeflow-producer\)/);
    const producerBatches = await streamEnd(bufferAs(pki.producer).batches({ hookPoint: HOOK, trainerId: "p", batchSize: 16 }));
    assert.equal(producerBatches.code, status.PERMISSION_DENIED);
    assert.match(producerBatches.details, /BufferService\/Batches refused to saeflow-producer: only transport.tls.trainers/);
    assert.equal(buffer.status().hookPoints[0]!.rowsIn, 0n, "no row came in through the refused Push");

    const push = new PushClient(bufferAs(pki.producer));
    for (let c = 0; c < 16; c++) {
      const answer = await push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: c, contexts: [c], rowsPerContext: 64 }));
      assert.equal(answer.code, status.OK, answer.message);
    }
    await push.end();
    const batches: BatchesResponse[] = [];
    for await (const b of bufferAs(pki.trainer).batches({
      hookPoint: HOOK,
      trainerId: "t0",
      batchSize: 64,
      maxBatches: 2n,
      includeIds: true,
    }) as AsyncIterable<BatchesResponse>)
      batches.push(b);
    assert.deepEqual(
      batches.map((b) => b.contextIds.length),
      [64, 64],
    );
  });

  it("reads Status for any valid certificate and health and reflection for any peer of the CA", async () => {
    for (const who of [pki.producer, pki.trainer, pki.operator]) {
      assert.equal((await bufferAs(who).status({}, deadline())).runId, "test");
    }
    const health = createClient(Health, buffer.address, as(base, pki.trainer));
    clients.push(health);
    assert.equal((await health.check({ service: BufferService.typeName }, deadline())).status, Serving.SERVING);
    const reflection = createClient(ServerReflection, buffer.address, as(base, pki.producer));
    clients.push(reflection);
    const listed = await new Promise<string[]>((resolve, reject) => {
      const call = reflection.serverReflectionInfo();
      call.once("data", (res: ServerReflectionResponse) => {
        call.end();
        resolve(res.messageResponse.case === "listServicesResponse" ? res.messageResponse.value.service.map((s) => s.name) : []);
      });
      call.once("error", reject);
      call.write(create(ServerReflectionRequestSchema, { messageRequest: { case: "listServices", value: "" } }));
    });
    assert.ok(listed.includes(BufferService.typeName));
  });

  it("lets the operator pause and resume", async () => {
    const operator = bufferAs(pki.operator);
    assert.equal((await operator.pause({}, deadline())).state, ServiceState.PAUSED);
    assert.equal((await operator.resume({}, deadline())).state, ServiceState.RUNNING);
  });

  it("is refused by a client that trusts another CA: the client checks the server too", async () => {
    const r = await refusal(bufferAs(undefined, as(base, pki.operator, pki.foreign.cert)).status({}, deadline()));
    assert.equal(r.code, status.UNAVAILABLE);
    assert.match(r.details, /self-signed certificate in certificate chain|unable to verify/);
  });
});
