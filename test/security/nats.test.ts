import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { connect, type NatsConnection, nkeys } from "@nats-io/transport-node";
import { type RunningBuffer, startBuffer } from "../../services/buffer/buffer.js";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { Demand, MemberAnnounce, subjects } from "../../services/common/coordination.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";
import { D_MODEL, HOOK, makeTestPki, type TestPki } from "./certs.js";

/** Real nats-servers started with config files that demand credentials (and TLS), and two runs sharing one server. */

const runConfig = (url: string, sets: string[], env: NodeJS.ProcessEnv = {}): RunConfig =>
  loadConfig({
    env,
    sets: [
      `nats.url=${url}`,
      `buffer.hookPoints=[{name: ${HOOK}, dModel: ${D_MODEL}}]`,
      "buffer.capacityRows=1024",
      `trainer.hookPoints=[${HOOK}]`,
      ...sets,
    ],
  });

async function refusedWith(connecting: Promise<Bus>): Promise<string> {
  try {
    const bus = await connecting;
    await bus.drain();
  } catch (err) {
    return (err as Error).message;
  }
  assert.fail("the NATS server let the client in");
}

const quiet = () => undefined;

describe("NATS that wants credentials and TLS", () => {
  let pki: TestPki;
  let dir: string;
  const servers: NatsServer[] = [];
  const start = async (conf: string) => {
    const file = join(dir, `nats-${servers.length}.conf`);
    writeFileSync(file, conf);
    const server = await startNatsServer({ configFile: file });
    servers.push(server);
    return server;
  };

  before(() => {
    pki = makeTestPki();
    dir = mkdtempSync(join(tmpdir(), "saeflow-nats-"));
  });
  after(async () => {
    await Promise.all(servers.map((s) => s.stop()));
    rmSync(dir, { recursive: true, force: true });
    pki.close();
  });

  it("takes a buffer with user, password and a client certificate, and refuses each one short of them", async () => {
    const nats = pki.ca.issue("nats", { cn: "nats" });
    const server = await start(
      `tls {\n  cert_file: "${nats.cert}"\n  key_file: "${nats.key}"\n  ca_file: "${pki.ca.cert}"\n  verify: true\n}\n` +
        `authorization {\n  users: [ { user: "saeflow", password: "0123456789" } ]\n}\n`,
    );
    const tls = [`nats.tls.ca=${pki.ca.cert}`, `nats.tls.cert=${pki.buffer.cert}`, `nats.tls.key=${pki.buffer.key}`];
    // As the chart passes it: the password in a file mounted from a Secret, all digits and still a string.
    const passwordFile = join(dir, "password");
    writeFileSync(passwordFile, "0123456789\n", { mode: 0o600 });
    const config = runConfig(server.url, [...tls], { SAEFLOW_NATS__USER: "saeflow", SAEFLOW_NATS__PASSWORD_FILE: passwordFile });
    // The same digits through an env var stay the same string (the loader reads a string key's text as text).
    assert.equal(
      runConfig(server.url, [], { SAEFLOW_NATS__USER: "saeflow", SAEFLOW_NATS__PASSWORD: "0123456789" }).nats.password,
      "0123456789",
    );
    const buffer = await startBuffer(config, { address: "127.0.0.1:0", log: quiet });
    assert.equal(buffer.status().state, ServiceState.RUNNING);
    await buffer.stop();

    const bus = (sets: string[]) => {
      const c = runConfig(server.url, sets);
      return connectBus({ url: c.nats.url, security: c.nats, name: "stranger", log: quiet, connectTimeoutMs: 3000 });
    };
    assert.match(await refusedWith(bus(tls)), /Authorization Violation/, "no credentials");
    assert.match(await refusedWith(bus([...tls, "nats.user=saeflow", "nats.password=guess"])), /Authorization Violation/);
    assert.match(
      await refusedWith(bus([`nats.tls.ca=${pki.ca.cert}`, "nats.user=saeflow", `nats.password="0123456789"`])),
      /timeout|certificate|closed/i,
      "no client certificate",
    );
    assert.match(
      await refusedWith(bus([`nats.tls.ca=${pki.ca.cert}`, `nats.tls.cert=${pki.stranger.cert}`, `nats.tls.key=${pki.stranger.key}`])),
      /timeout|certificate|closed|Authorization/i,
      "a certificate from another CA",
    );
    await assert.rejects(startBuffer(runConfig(server.url, tls), { address: "127.0.0.1:0", log: quiet }), /Authorization Violation/);
  });

  it("takes a token or an nkey seed file, and refuses a wrong token", async () => {
    const user = nkeys.createUser();
    const server = await start(`authorization {\n  token: "s3cret-token"\n}\n`);
    const seedFile = join(dir, "user.nk");
    writeFileSync(seedFile, `${new TextDecoder().decode(user.getSeed())}\n`, { mode: 0o600 });
    const nkeyServer = await start(`authorization {\n  users: [ { nkey: "${user.getPublicKey()}" } ]\n}\n`);
    const bus = (url: string, sets: string[]) => {
      const c = runConfig(url, sets);
      return connectBus({ url: c.nats.url, security: c.nats, name: "t", log: quiet, connectTimeoutMs: 3000 });
    };
    const good = await bus(server.url, ["nats.token=s3cret-token"]);
    assert.equal(await good.flush(), true);
    await good.drain();
    assert.match(await refusedWith(bus(server.url, ["nats.token=wrong"])), /Authorization Violation/);
    const byNkey = await bus(nkeyServer.url, [`nats.nkeyFile=${seedFile}`]);
    assert.equal(await byNkey.flush(), true);
    await byNkey.drain();
    assert.match(await refusedWith(bus(nkeyServer.url, [])), /Authorization Violation/);
  });
});

describe("two runs on one nats-server", () => {
  let server: NatsServer;
  let tap: NatsConnection;
  const heard: Array<{ subject: string; text: string }> = [];
  const buffers: Record<string, RunningBuffer> = {};
  const producers: Record<string, Bus> = {};
  const demands: Record<string, Demand[]> = { "run-a": [], "run-b": [] };

  before(async () => {
    server = await startNatsServer();
    // Everything said on the server, whatever its subject.
    tap = await connect({ servers: server.url });
    tap.subscribe(">", {
      callback: (_err, msg) => void heard.push({ subject: msg.subject, text: new TextDecoder().decode(msg.data) }),
    });
    await tap.flush();
    for (const run of ["run-a", "run-b"]) {
      buffers[run] = await startBuffer(runConfig(server.url, [`run.id=${run}`]), { address: "127.0.0.1:0", log: quiet });
      const s = subjects("saeflow", run);
      const id = `producer-of-${run}`;
      const announce = { producerId: id, hookPoints: [HOOK], address: "", chunkRows: 64 };
      const bus = (producers[run] = await connectBus({ url: server.url, name: id, log: quiet }));
      bus.subscribe(s.demand, Demand, (d) => demands[run]!.push(d));
      bus.publish(s.join, MemberAnnounce, announce);
      demands[run]!.push(await bus.request(s.hello, MemberAnnounce, announce, Demand, 5000));
      bus.publish(s.heartbeat, MemberAnnounce, announce);
      await bus.flush();
    }
    // A buffer repeats its Demand every heartbeat (1 s): wait for at least one of each.
    await new Promise((r) => setTimeout(r, 1500));
  });
  after(async () => {
    for (const bus of Object.values(producers)) await bus.drain();
    for (const b of Object.values(buffers)) await b.stop();
    await tap.drain();
    await server.stop();
  });

  it("scopes every subject by run: each buffer knows only its own producer, each producer hears only its own buffer", () => {
    assert.deepEqual(buffers["run-a"]!.status().producers, ["producer-of-run-a"]);
    assert.deepEqual(buffers["run-b"]!.status().producers, ["producer-of-run-b"]);
    for (const run of ["run-a", "run-b"]) {
      assert.ok(demands[run]!.length >= 2, `${run}: the hello answer and a heartbeat Demand`);
      for (const d of demands[run]!) assert.deepEqual(Object.keys(d.grants), [`producer-of-${run}`]);
    }
    const runOf = (subject: string) => /^saeflow\.(run-[ab])\./.exec(subject)?.[1];
    const scoped = heard.filter((m) => runOf(m.subject));
    assert.ok(
      scoped.some((m) => m.subject === "saeflow.run-a.shard.0.buffer.demand") &&
        scoped.some((m) => m.subject === "saeflow.run-b.shard.0.buffer.demand"),
    );
    for (const m of scoped) {
      const other = runOf(m.subject) === "run-a" ? "run-b" : "run-a";
      assert.ok(!m.text.includes(`producer-of-${other}`), `${m.subject} carried ${other}'s producer: ${m.text}`);
    }
    // Replies travel on inboxes, never on another run's subjects.
    assert.ok(
      heard.every((m) => runOf(m.subject) || m.subject.startsWith("_INBOX.")),
      heard.map((m) => m.subject).join(", "),
    );
  });

  it("drains one run without the other hearing of it", async () => {
    const client = createClient(BufferService, buffers["run-a"]!.address, runConfig(server.url, []).transport);
    await client.drain({}, { deadline: Date.now() + 5000 });
    client.close();
    await producers["run-a"]!.flush();
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(heard.some((m) => m.subject === "saeflow.run-a.run.state" && m.text.includes("draining")));
    assert.ok(!heard.some((m) => m.subject.startsWith("saeflow.run-b.run.")), "run-b's subjects carried no run state");
    assert.equal(buffers["run-b"]!.status().state, ServiceState.RUNNING);
  });
});
