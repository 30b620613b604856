import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { connect } from "@nats-io/transport-node";
import { z } from "zod";
import { Demand, MemberAnnounce, subjects } from "../../services/common/coordination.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import { type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";

const nextMessage = <T>(subscribe: (resolve: (m: T) => void) => void): Promise<T> => new Promise(subscribe);

describe("NATS helper against a real nats-server", () => {
  let server: NatsServer;
  let a: Bus;
  let b: Bus;
  const logs: string[] = [];
  const s = subjects("saeflow", "test-run");

  before(async () => {
    server = await startNatsServer();
    a = await connectBus({ url: server.url, name: "a", log: (l) => logs.push(l) });
    b = await connectBus({ url: server.url, name: "b", log: (l) => logs.push(l) });
  });
  after(async () => {
    await a.drain();
    await b.drain();
    await server.stop();
  });

  it("delivers valid messages and drops invalid ones with a logged reason", async () => {
    const got: Demand[] = [];
    const sub = b.subscribe(s.demand, Demand, (m) => got.push(m));
    await b.flush();
    // A peer that does not go through the helper: raw bytes on the subject.
    const raw = await connect({ servers: server.url });
    raw.publish(s.demand, new TextEncoder().encode('{"cycle": -1, "command": "refill", "grants": {}, "freeRows": {}}'));
    raw.publish(s.demand, new TextEncoder().encode("not json"));
    await raw.flush();
    a.publish(s.demand, Demand, { cycle: 3, command: "pause", grants: { p0: 128 }, freeRows: { h: 0 } });
    assert.ok(await a.flush());
    await raw.drain();
    await b.flush();
    await new Promise((r) => setTimeout(r, 50));
    sub.unsubscribe();
    assert.deepEqual(got, [{ cycle: 3, command: "pause", grants: { p0: 128 }, freeRows: { h: 0 }, done: [], endedShards: [] }]);
    assert.ok(logs.some((l) => l.includes("dropped invalid message") && l.includes("cycle")));
    assert.ok(logs.some((l) => l.includes("dropped non-JSON message")));
  });

  it("refuses to publish a message that breaks its schema", () => {
    assert.throws(() => a.publish(s.demand, Demand, { cycle: 0, command: "stop" as "pause", grants: {}, freeRows: {} }));
  });

  it("answers requests with validated replies", async () => {
    const sub = b.reply(s.hello, MemberAnnounce, Demand, (m) => ({
      cycle: 1,
      command: "refill" as const,
      grants: { [m.producerId]: 64 },
      freeRows: { h: 64 },
    }));
    await b.flush();
    const demand = await a.request(
      s.hello,
      MemberAnnounce,
      { producerId: "p1", hookPoints: ["h"], address: "", chunkRows: 8 },
      Demand,
      2000,
    );
    assert.deepEqual(demand.grants, { p1: 64 });
    sub.unsubscribe();
  });

  it("reconnects after the server restarts", async () => {
    const port = server.port;
    const events: boolean[] = [];
    let reconnectedNow!: () => void;
    const reconnected = new Promise<void>((resolve) => (reconnectedNow = resolve));
    const lines: string[] = [];
    const bus = await connectBus({
      url: server.url,
      name: "restarter",
      log: (l) => lines.push(l),
      onConnection: (up) => {
        events.push(up);
        if (up) reconnectedNow();
      },
    });
    await server.stop();
    server = await startNatsServer({ port });
    await reconnected;
    const Ping = z.object({ n: z.number() });
    const got = nextMessage<number>((resolve) => bus.subscribe("ping", Ping, (m) => resolve(m.n)));
    await bus.flush();
    const other = await connectBus({ url: server.url, name: "other" });
    other.publish("ping", Ping, { n: 7 });
    await other.flush();
    assert.equal(await got, 7);
    assert.deepEqual(events, [false, true], "told of the loss, then of the return");
    assert.ok(lines.some((l) => l.includes("lost the connection")) && lines.some((l) => l.includes("reconnected")));
    await other.drain();
    await bus.drain();
    assert.equal(bus.isClosed(), true);
    // a and b reconnected too; the after hook closes them.
  });
});
