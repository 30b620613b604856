import assert from "node:assert/strict";
import { createServer, type Socket } from "node:net";
import { describe, it } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { startServer } from "../../services/common/grpc/server.js";
import { Health, HealthCheckResponse_ServingStatus } from "../../services/gen/grpc/health/v1/health_pb.js";

// A channel waiting for a server that went away (a buffer restarted or rescheduled) keeps trying it
// every half second however long it was away, and connects soon after it is back. grpc-js' own
// backoff waits 1 s, then 1.6x longer each try (up to 120 s): tries near 1, 2.6 and 5.2 s into an
// outage. While the server is away, a listener on its port counts the tries (each connection is
// closed at once, a failed connect to the channel).
const transport = RunConfigSchema.parse({}).transport;
const OUTAGE_MS = 6000;

describe("a channel whose server went away", { timeout: 60_000 }, () => {
  it("tries it again at least twice a second during a 6 s outage and connects soon after it is back", async () => {
    const first = await startServer("127.0.0.1:0", transport, []);
    const client = createClient(Health, first.address, transport);
    const tries: number[] = [];
    const sockets = new Set<Socket>();
    try {
      await client.ready(5000);
      await first.close(0);
      const away = createServer((socket) => {
        tries.push(Date.now());
        socket.destroy();
      });
      away.on("connection", (socket) => sockets.add(socket));
      await new Promise<void>((resolve) => away.listen(first.port, "127.0.0.1", resolve));
      const lost = Date.now();
      // As the streams' retry loops do: waiting for the channel the whole time.
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
      await new Promise<void>((resolve) => away.close(() => resolve()));
      const again = await startServer(first.address, transport, []);
      again.health.set(Serving.SERVING);
      const returned = Date.now();
      try {
        const reconnectedMs = (await back) - returned;
        const late = tries.filter((t) => t - lost >= 1000).length;
        process.stdout.write(
          `figure: ${tries.length} tries in a ${OUTAGE_MS / 1000} s outage (${late} after its first second); connected ${reconnectedMs} ms after the server was back\n`,
        );
        // Ours: every 0.5 s (+-20%) once grown, ~9 tries after the first second; grpc-js' own: 2.
        assert.ok(
          late >= 6,
          `only ${late} tries between 1 s and ${OUTAGE_MS / 1000} s into the outage: ${tries.map((t) => t - lost).join(", ")} ms`,
        );
        assert.ok(reconnectedMs < 2000, `connected ${reconnectedMs} ms after the server was back`);
        assert.equal((await client.check({ service: "" })).status, HealthCheckResponse_ServingStatus.SERVING);
      } finally {
        await again.close(0);
      }
    } finally {
      for (const s of sockets) s.destroy();
      client.close();
    }
  });
});
