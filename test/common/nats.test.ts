import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { z } from "zod";
import { Demand, MemberAnnounce, subjects } from "../../services/common/coordination.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import { type NatsServer, startNatsServer } from "../../services/common/nats-server.js";

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
    await a.close();
    await b.close();
    await server.stop();
  });

  it("delivers valid messages and drops invalid ones with a logged reason", async () => {
    const got: Demand[] = [];
    const sub = b.subscribe(s.demand, Demand, (m) => got.push(m));
    await b.nc.flush();
    a.nc.publish(s.demand, new TextEncoder().encode('{"cycle": -1, "command": "refill", "grants": {}, "freeRows": {}}'));
    a.nc.publish(s.demand, new TextEncoder().encode("not json"));
    a.publish(s.demand, Demand, { cycle: 3, command: "pause", grants: { p0: 128 }, freeRows: { h: 0 } });
    await a.nc.flush();
    await b.nc.flush();
    await new Promise((r) => setTimeout(r, 50));
    sub.unsubscribe();
    assert.deepEqual(got, [{ cycle: 3, command: "pause", grants: { p0: 128 }, freeRows: { h: 0 } }]);
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
    await b.nc.flush();
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
    const bus = await connectBus({ url: server.url, name: "restarter", log: () => undefined });
    const reconnected = nextMessage<void>((resolve) => {
      void (async () => {
        for await (const st of bus.nc.status()) if (st.type === "reconnect") return resolve();
      })();
    });
    await server.stop();
    server = await startNatsServer({ port });
    await reconnected;
    const Ping = z.object({ n: z.number() });
    const got = nextMessage<number>((resolve) => bus.subscribe("ping", Ping, (m) => resolve(m.n)));
    await bus.nc.flush();
    const other = await connectBus({ url: server.url, name: "other" });
    other.publish("ping", Ping, { n: 7 });
    await other.nc.flush();
    assert.equal(await got, 7);
    await other.close();
    await bus.close();
    // a and b reconnected too; the after hook closes them.
  });
});
