import assert from "node:assert/strict";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import { ConfigError, type TransportConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { as, makeTestPki, plaintext, type TestPki, tlsConfig } from "./certs.js";

/**
 * What every role's server does under transport.tls, on a server built as every role builds its
 * own (startServer) with the producer's service: the plaintext health port, configured readers,
 * identities by SAN, plain TLS without client certificates, certificates renewed in place.
 */

const deadline = () => ({ deadline: Date.now() + 5000 });
const idle = async () => ({});
const producerService = () => [bind(ProducerService, { status: idle, pause: idle, resume: idle })];

async function codeOf(call: Promise<unknown>): Promise<{ code: number; details: string }> {
  try {
    await call;
    return { code: status.OK, details: "" };
  } catch (err) {
    return err as { code: number; details: string };
  }
}

describe("a role's gRPC server under transport.tls", () => {
  let pki: TestPki;
  const servers: RunningServer[] = [];
  const clients: Array<{ close(): void }> = [];
  const serve = async (transport: TransportConfig) => {
    const s = await startServer("127.0.0.1:0", transport, producerService());
    s.health.set(Serving.SERVING);
    servers.push(s);
    return s;
  };
  const producerAt = (address: string, transport: TransportConfig) => {
    const c = createClient(ProducerService, address, transport);
    clients.push(c);
    return c;
  };

  before(() => {
    pki = makeTestPki();
  });
  after(async () => {
    for (const c of clients) c.close();
    await Promise.all(servers.map((s) => s.close()));
    pki.close();
  });

  it("serves grpc.health.v1 alone in plaintext on healthAddress while the main port refuses plaintext", async () => {
    const base = tlsConfig(pki, pki.producer, "mtls", ["transport.tls.healthAddress=127.0.0.1:0"]).transport;
    const server = await serve(base);
    assert.ok(server.healthAddress && server.healthAddress !== server.address);
    const health = createClient(Health, server.healthAddress, plaintext(base));
    clients.push(health);
    assert.equal((await health.check({ service: ProducerService.typeName }, deadline())).status, Serving.SERVING);
    server.health.set(Serving.NOT_SERVING);
    assert.equal((await health.check({ service: "" }, deadline())).status, Serving.NOT_SERVING, "the same statuses as the main port");
    server.health.set(Serving.SERVING);
    assert.equal((await codeOf(producerAt(server.healthAddress, plaintext(base)).status({}, deadline()))).code, status.UNIMPLEMENTED);
    assert.equal((await codeOf(producerAt(server.address, plaintext(base)).status({}, deadline()))).code, status.UNAVAILABLE);
  });

  it("reads Status only for the configured statusReaders", async () => {
    const base = tlsConfig(pki, pki.producer, "mtls", ["transport.tls.statusReaders=[saeflow-operator]"]).transport;
    const server = await serve(base);
    const refused = await codeOf(producerAt(server.address, as(base, pki.trainer)).status({}, deadline()));
    assert.equal(refused.code, status.PERMISSION_DENIED);
    assert.match(
      refused.details,
      /ProducerService\/Status refused to saeflow-trainer: only transport.tls.statusReaders \(saeflow-operator\)/,
    );
    assert.equal((await codeOf(producerAt(server.address, as(base, pki.operator)).status({}, deadline()))).code, status.OK);
  });

  it("knows a caller by any subjectAltName as well as by its CN", async () => {
    const spiffe = "spiffe://cluster.local/ns/ml/sa/saeflow-operator";
    const pod = pki.ca.issue("pod-7", { cn: "pod-7", sans: ["DNS:localhost", `URI:${spiffe}`] });
    const base = tlsConfig(pki, pki.producer, "mtls", [`transport.tls.operators=["${spiffe}"]`]).transport;
    const server = await serve(base);
    assert.equal((await codeOf(producerAt(server.address, as(base, pod)).pause({}, deadline()))).code, status.OK);
    const byName = await codeOf(producerAt(server.address, as(base, pki.operator)).pause({}, deadline()));
    assert.equal(byName.code, status.PERMISSION_DENIED, "saeflow-operator is no longer listed");
  });

  it("under plain tls encrypts and proves the server, and takes clients without certificates", async () => {
    const base = tlsConfig(pki, pki.producer, "tls").transport;
    const server = await serve(base);
    assert.equal((await codeOf(producerAt(server.address, as(base, undefined)).pause({}, deadline()))).code, status.OK);
    assert.equal((await codeOf(producerAt(server.address, plaintext(base)).status({}, deadline()))).code, status.UNAVAILABLE);
  });

  it("re-reads its CA bundle, so a renewed Secret takes effect without a restart", async () => {
    const caFile = join(pki.dir, "rotating-ca.crt");
    copyFileSync(pki.ca.cert, caFile);
    const base = tlsConfig(pki, pki.producer, "mtls", [`transport.tls.ca=${caFile}`, "transport.tls.reloadMs=100"]).transport;
    const server = await serve(base);
    const stranger = { ...as(base, pki.stranger), tls: { ...as(base, pki.stranger).tls, ca: pki.ca.cert } };
    assert.equal((await codeOf(producerAt(server.address, stranger).pause({}, deadline()))).code, status.UNAUTHENTICATED);
    writeFileSync(caFile, `${readFileSync(pki.ca.cert, "utf8")}${readFileSync(pki.foreign.cert, "utf8")}`);
    let code: number = status.UNAUTHENTICATED;
    for (const until = Date.now() + 10_000; code !== status.OK && Date.now() < until;) {
      await new Promise((r) => setTimeout(r, 100));
      // A new client is a new connection: TLS checks certificates once per handshake.
      code = (await codeOf(producerAt(server.address, stranger).pause({}, deadline()))).code;
    }
    assert.equal(code, status.OK, "the foreign CA, now in the bundle, is trusted");
  });

  it("refuses to start on a missing certificate or a key that is not the certificate's, naming the key", async () => {
    const missing = tlsConfig(pki, { cert: join(pki.dir, "nope.crt"), key: pki.producer.key }).transport;
    await assert.rejects(startServer("127.0.0.1:0", missing, producerService()), (err: unknown) => {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.keys, ["transport.tls.cert"]);
      assert.match(err.message, /cannot read .*nope\.crt/);
      return true;
    });
    const mismatched = tlsConfig(pki, { cert: pki.producer.cert, key: pki.trainer.key }).transport;
    assert.throws(
      () => createClient(ProducerService, "127.0.0.1:1", mismatched),
      (err: unknown) => err instanceof ConfigError && err.keys[0] === "transport.tls.key" && /is not the private key of/.test(err.message),
    );
  });
});
