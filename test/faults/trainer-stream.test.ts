import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { startBuffer } from "../../services/buffer/buffer.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { PrefetchedBatches } from "../../services/trainer/prefetch.js";
import { freePort } from "../../tools/cli/nats-server.js";
import { D_MODEL, HOOK, makeChunk, PushClient } from "../buffer/support.js";

// The trainer's batch stream rides through a buffer's restart: it reconnects with backoff under the
// same trainer id and the training thread just waits at its step; past buffer.trainerAwayMs it gives
// up with an error naming that key. Real buffers (no NATS: pushes held back by flow control alone)
// on one loopback port, stopped and started again with the same state file.
const dir = mkdtempSync(join(tmpdir(), "saeflow-trainer-stream-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function config(address: string, awayMs: number): RunConfig {
  return loadConfig({
    sets: [
      "run.id=stream",
      `run.dir=${dir}`,
      `buffer.address=${address}`,
      `buffer.hookPoints=[{name: ${HOOK}, dModel: ${D_MODEL}}]`,
      "buffer.capacityRows=1024",
      `buffer.stateFile=${join(dir, "buffer.state.json")}`,
      `buffer.trainerAwayMs=${awayMs}`,
      `trainer.bufferAddress=${address}`,
      `trainer.hookPoint=${HOOK}`,
      `trainer.dModel=${D_MODEL}`,
      "trainer.batchSize=64",
    ],
  });
}

/** A buffer on `address` filled with 16 contexts from `first` on (a full pool serves). */
async function filledBuffer(c: RunConfig, first: number) {
  const buffer = await startBuffer(c, { bus: null, log: () => undefined });
  const client = createClient(BufferService, buffer.address, c.transport);
  const push = new PushClient(client);
  for (let i = first; i < first + 16; i++) {
    await push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: i, contexts: [i], rowsPerContext: 64, runId: "stream" }));
  }
  return {
    buffer,
    stop: async () => {
      push.cancel();
      client.close();
      await buffer.stop();
    },
  };
}

describe("the trainer's stream when the buffer goes away", { timeout: 60_000 }, () => {
  test("reconnects to the restarted buffer and goes on, saying so", async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const c = config(address, 20_000);
    const lines: string[] = [];
    const first = await filledBuffer(c, 0);
    const source = new PrefetchedBatches(c, [], 1, (l) => lines.push(l));
    try {
      const before = [await source.next(), await source.next()];
      assert.ok(before.every((b) => b?.rows === 64));
      await first.stop();
      // What was prefetched still comes; then the source waits for the next buffer (contexts 16 and on).
      const fromSecond = (async () => {
        for (;;) {
          const b = await source.next();
          if (!b || (b.data as Float32Array)[0]! >= 16) return b;
        }
      })();
      await new Promise((r) => setTimeout(r, 500));
      const second = await filledBuffer(c, 16);
      try {
        assert.equal((await fromSecond)?.rows, 64, "a batch from the restarted buffer");
      } finally {
        await second.stop();
      }
    } finally {
      source.close();
    }
    assert.ok(
      lines.some((l) => /^stream from the buffer lost \(14 UNAVAILABLE: .*\); reconnecting for up to 20 s$/.test(l)),
      lines.join("\n"),
    );
    assert.ok(
      lines.some((l) => /^stream from the buffer back after \d+ ms; training goes on$/.test(l)),
      lines.join("\n"),
    );
  });

  test("gives up after buffer.trainerAwayMs with an error naming the key", async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const c = config(address, 1500);
    rmSync(join(dir, "buffer.state.json"), { force: true });
    const only = await filledBuffer(c, 0);
    const source = new PrefetchedBatches(c, []);
    try {
      await source.next();
      await only.stop();
      const started = Date.now();
      await assert.rejects(
        (async () => {
          for (;;) if (!(await source.next())) return;
        })(),
        /the buffer at 127\.0\.0\.1:\d+ gave no batch for \d+ s \(buffer\.trainerAwayMs is 1500\)/,
      );
      assert.ok(Date.now() - started < 10_000);
    } finally {
      source.close();
    }
  });
});
