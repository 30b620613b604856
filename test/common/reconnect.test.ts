import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";
import { describe, it } from "node:test";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { startServer } from "../../services/common/grpc/server.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../services/gen/grpc/health/v1/health_pb.js";

// A channel waiting for a server that went away (a buffer restarted or rescheduled) finds it again
// soon after it is back, however long it was away. grpc-js' own backoff (1 s, 1.6x a try, up to
// 120 s) would try at about 9.3 s and 15.8 s into this outage, 3 s or more after the server is back.
const transport = RunConfigSchema.parse({}).transport;
const OUTAGE_MS = 10_500;

describe("a channel whose server went away", { timeout: 60_000 }, () => {
  it("connects again within about half a second of the server's return after a 10 s outage", async () => {
    const first = await startServer("127.0.0.1:0", transport, []);
    const client = createClient(Health, first.address, transport);
    try {
      await client.ready(5000);
      await first.close(0);
      // As the streams' retry loops do: waiting for the channel the whole time, never longer than half a second a try.
      const back = (async () => {
        for (;;) {
          try {
            await client.ready(500);
            return Date.now();
          } catch {
            // not yet
          }
        }
      })();
      await sleep(OUTAGE_MS);
      const again = await startServer(first.address, transport, []);
      again.health.set(Serving.SERVING);
      const returned = Date.now();
      try {
        const reconnectedMs = (await back) - returned;
        process.stdout.write(`figure: connected ${reconnectedMs} ms after the server came back from a ${OUTAGE_MS / 1000} s outage\n`);
        assert.ok(reconnectedMs < 2500, `connected ${reconnectedMs} ms after the server was back`);
        assert.equal((await client.check({ service: "" })).status, HealthCheckResponse_ServingStatus.SERVING);
      } finally {
        await again.close(0);
      }
    } finally {
      client.close();
    }
  });
});
