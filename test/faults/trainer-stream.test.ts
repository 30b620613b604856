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
import { MergedBatches } from "../../services/trainer/merged.js";
import { freePort } from "../../tools/cli/nats-server.js";
import { D_MODEL, HOOK, makeChunk, PushClient } from "../buffer/support.js";

// The trainer's batch stream rides through a buffer's restart: it reconnects with backoff under the
// same trainer id and the training thread just waits at its step; past buffer.trainerAwayMs it gives
// up with an error naming that key. Real buffers (no NATS: pushes held back by flow control alone)
// on one loopback port, stopped and started again with the same state file.
const dir = mkdtempSync(join(tmpdir(), "saeflow-trainer-stream-"));
after(() => rmSync(dir, { recursive: true, force: true }));

function config(address: string, awayMs: number, more: string[] = []): RunConfig {
  return loadConfig({
    sets: [
      "run.id=stream",
      `run.dir=${dir}`,
      `buffer.address=${address}`,
      `buffer.hookPoints=[{name: ${HOOK}, dModel: ${D_MODEL}}]`,
      "buffer.capacityRows=1024",
      `buffer.stateFile=${join(dir, "buffer.state.json")}`,
      `buffer.trainerAwayMs=${awayMs}`,
      `trainer.hookPoints=[${HOOK}]`,
      "trainer.batchSize=64",
      ...more,
    ],
  });
}

/** A buffer on `address` filled with 16 contexts from `first` on (a full pool serves); a row's first value is its context. */
async function filledBuffer(c: RunConfig, first: number, dModel = D_MODEL) {
  const buffer = await startBuffer(c, { bus: null, log: () => undefined });
  const client = createClient(BufferService, buffer.address, c.transport);
  const push = new PushClient(client);
  for (let i = first; i < first + 16; i++) {
    await push.send(
      makeChunk({ producerId: "p", producerNumber: 0, sequence: i, contexts: [i], rowsPerContext: 64, runId: "stream", dModel }),
    );
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
    const source = new PrefetchedBatches(c, { hookPoint: HOOK, address }, [], 1, (l) => lines.push(l));
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
      lines.some((l) =>
        /^stream of blocks\.\d+\.\w+ from the buffer at 127\.0\.0\.1:\d+ lost \(14 UNAVAILABLE: .*\); reconnecting for up to 20 s$/.test(l),
      ),
      lines.join("\n"),
    );
    assert.ok(
      lines.some((l) => /^stream of blocks\.\d+\.\w+ from the buffer at 127\.0\.0\.1:\d+ back after \d+ ms; training goes on$/.test(l)),
      lines.join("\n"),
    );
  });

  test("gives up after buffer.trainerAwayMs with an error naming the key", async () => {
    const address = `127.0.0.1:${await freePort()}`;
    const c = config(address, 1500);
    rmSync(join(dir, "buffer.state.json"), { force: true });
    const only = await filledBuffer(c, 0);
    const source = new PrefetchedBatches(c, { hookPoint: HOOK, address }, []);
    try {
      await source.next();
      await only.stop();
      const started = Date.now();
      await assert.rejects(
        (async () => {
          for (;;) if (!(await source.next())) return;
        })(),
        /the buffer at 127\.0\.0\.1:\d+ gave no blocks\.\d+\.\w+ batch for \d+ s \(buffer\.trainerAwayMs is 1500\)/,
      );
      assert.ok(Date.now() - started < 10_000);
    } finally {
      source.close();
    }
  });

  test("a hook point on 2 shards: rows come from both, and one shard restarted does not stop the other's", async () => {
    const addresses = [`127.0.0.1:${await freePort()}`, `127.0.0.1:${await freePort()}`];
    const table = `buffer.shards=[${addresses.map((a) => `{address: "${a}", hookPoints: [${HOOK}]}`).join(", ")}]`;
    // Rows wide enough that few batches fit in a stream's flow-control window: what a stopped shard
    // had in flight is soon taken.
    const d = 256;
    const shard = (i: number) =>
      config(addresses[i]!, 20_000, [
        table,
        `buffer.shard=${i}`,
        `buffer.stateFile=${join(dir, `shard-${i}.state.json`)}`,
        `buffer.hookPoints=[{name: ${HOOK}, dModel: ${d}}]`,
        "trainer.batchSize=16",
      ]);
    // Shard 0 holds contexts 0-15, shard 1 contexts 100-115; shard 0 comes back with 200-215.
    const buffers = [await filledBuffer(shard(0), 0, d), await filledBuffer(shard(1), 100, d)];
    const lines: string[] = [];
    // Each shard's stream on its thread, merged as bufferSource does; read once both are open, so that
    // neither shard's 49 batches (no producer refills them) are spent before the other's stream opens.
    const streams = addresses.map((address) => new PrefetchedBatches(shard(0), { hookPoint: HOOK, address }, [], 1, (l) => lines.push(l)));
    const source = new MergedBatches(streams);
    for (const until = Date.now() + 30_000; streams.some((s) => s.waiting === 0) && Date.now() < until;)
      await new Promise((r) => setTimeout(r, 50));
    const seen: number[] = [];
    /** Takes batches until `done` holds of what was seen (at most `most` batches), noting which shard (0, 1, or 2 = 0 again) each came from. */
    const takeUntil = async (done: () => boolean, most: number) => {
      for (let i = 0; i < most && !done(); i++) seen.push(Math.floor(((await source.next())!.data as Float32Array)[0]! / 100));
      return done();
    };
    try {
      assert.ok(await takeUntil(() => seen.includes(0) && seen.includes(1), 10), `rows from both shards: ${seen.join(",")}`);
      await buffers[0]!.stop();
      const at = seen.length;
      const runOfOnes = () => seen.length - at >= 10 && seen.slice(-10).every((s) => s === 1);
      assert.ok(await takeUntil(runOfOnes, 30), `shard 1's rows go on while shard 0 is down: ${seen.slice(at).join(",")}`);
      buffers[0] = await filledBuffer(shard(0), 200, d);
      assert.ok(await takeUntil(() => seen.includes(2), 80), `shard 0's new rows once it is back: ${seen.join(",")}`);
    } finally {
      source.close();
      for (const b of buffers) await b.stop();
    }
    assert.ok(
      lines.some((l) => l.startsWith(`stream of ${HOOK} from the buffer at ${addresses[0]} lost (14 UNAVAILABLE`)),
      lines.join("\n"),
    );
    assert.ok(
      lines.some((l) => l.startsWith(`stream of ${HOOK} from the buffer at ${addresses[0]} back after`)),
      lines.join("\n"),
    );
  });
});
