import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { Demand, subjects, TrainerDone } from "../../services/common/coordination.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import type { RoleDeps } from "../../services/common/role.js";
import { type RunningBuffer, startBuffer } from "../../services/buffer/buffer.js";
import { type BatchesResponse, BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { type RunningProducer, startProducer } from "../../services/producer/producer.js";
import { freePort, type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";
import type { TinyLlama } from "../../tools/model/tiny-llama.js";
import { D_MODEL, paragraphs, tinyModel, writeDataset } from "./harness.js";

// Producers against real buffer shards: nats-server, buffer processes' gRPC servers on loopback,
// onnxruntime on the tiny Llama. Each test is its own run (its own subjects).

const [H0, H1, H2] = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"] as const;
const quiet = { address: "127.0.0.1:0", log: () => undefined };

/** Polls `ready` until it holds; rejects after a minute (a hang, not a slow machine). */
async function poll(ready: () => boolean | Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!(await ready())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A hook point's counters in a buffer's status. */
function pool(buffer: RunningBuffer, hook: string) {
  const found = buffer.status().hookPoints.find((h) => h.hookPoint === hook);
  assert.ok(found, `no pool ${hook} on shard ${buffer.status().shard}`);
  return found;
}
const rowsIn = (buffer: RunningBuffer, hook: string) => Number(pool(buffer, hook).rowsIn);

interface ShardedRun {
  buffers: RunningBuffer[];
  logs: string[][];
  /** Demand messages seen on each shard's subject. */
  demands: Demand[][];
  config(producer?: Record<string, unknown>): RunConfig;
  /** Stops shard `i` and starts it again at its address, going on from its buffer.stateFile. */
  restart(i: number): Promise<void>;
  /** Starts a producer that close() stops too, so that a failed assertion does not leave it holding the test file open. */
  producer(config: RunConfig, deps: RoleDeps): Promise<RunningProducer>;
  close(): Promise<void>;
}

/**
 * trainer-1 reading H1 from shard 1, which makes room there; resolves once the shard has taken 1024
 * more rows of it (`what` names that wait), with the reader to stop.
 */
async function readH1UntilFed(run: ShardedRun, what: string): Promise<{ stop(): void }> {
  const client = createClient(BufferService, run.buffers[1]!.address, run.config().transport);
  const stream = client.batches({ hookPoint: H1, trainerId: "trainer-1", batchSize: 64 });
  stream.on("data", () => undefined);
  stream.on("error", () => undefined);
  const before = rowsIn(run.buffers[1]!, H1);
  await poll(() => rowsIn(run.buffers[1]!, H1) > before + 1024, what);
  return {
    stop: () => {
      stream.cancel();
      client.close();
    },
  };
}

describe("producer with buffer shards", () => {
  let nats: NatsServer;
  let model: TinyLlama;
  let data: string;
  let dir: string;
  let watch: Bus;
  let runs = 0;
  before(async () => {
    model = tinyModel();
    nats = await startNatsServer();
    watch = await connectBus({ url: nats.url, name: "watch", log: () => undefined });
    dir = mkdtempSync(join(tmpdir(), "saeflow-shards-"));
    data = writeDataset(dir, "shards", { "doc.txt": paragraphs(12) });
  });
  after(async () => {
    await watch.drain();
    await nats.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  /** Starts one buffer process per entry of `table` (the hook points each holds) for a fresh run. */
  async function startRun(table: string[][], pools: string[], sets: Record<string, unknown> = {}): Promise<ShardedRun> {
    const runId = `shards${runs++}`;
    const addresses = await Promise.all(table.map(async () => `127.0.0.1:${await freePort()}`));
    const base = {
      run: { id: runId, dir: join(dir, runId) },
      nats: { url: nats.url },
      buffer: {
        hookPoints: pools.map((name) => ({ name, dModel: D_MODEL })),
        shards: table.map((hookPoints, i) => ({ address: addresses[i], hookPoints })),
        capacityRows: 4096,
        ...(sets.buffer as object),
      },
      trainer: { hookPoints: [pools[0]], ...(sets.trainer as object) },
    };
    const demands: Demand[][] = table.map(() => []);
    const subs = table.map((_, i) => watch.subscribe(subjects("saeflow", runId, i).demand, Demand, (d) => demands[i]!.push(d)));
    await watch.flush();
    const logs: string[][] = table.map(() => []);
    const configs = addresses.map((address, i) =>
      loadConfig({
        base: { ...base, buffer: { ...base.buffer, shard: i, address, stateFile: join(dir, runId, `buffer-${i}.state.json`) } },
      }),
    );
    const buffers: RunningBuffer[] = [];
    for (const [i, config] of configs.entries()) buffers.push(await startBuffer(config, { log: (line) => logs[i]!.push(line) }));
    const producers: RunningProducer[] = [];
    return {
      buffers,
      logs,
      demands,
      restart: async (i) => {
        await buffers[i]!.stop();
        buffers[i] = await startBuffer(configs[i]!, { log: (line) => logs[i]!.push(line) });
      },
      config: (producer = {}) =>
        loadConfig({
          base: {
            ...base,
            producer: {
              model: model.modelPath,
              address: "127.0.0.1:0",
              dataset: [data],
              contextLength: 16,
              batchContexts: 4,
              epochs: 1,
              resume: false,
              hookPoints: pools,
              ...producer,
            },
          },
        }),
      producer: async (config, deps) => {
        const p = await startProducer(config, deps);
        producers.push(p);
        return p;
      },
      close: async () => {
        await Promise.all(producers.map((p) => p.stop()));
        for (const s of subs) s.unsubscribe();
        for (const b of buffers) await b.stop();
      },
    };
  }

  it("feeds two shards holding disjoint hook points from one pass: each gets only its rows, granted and counted per shard", async () => {
    const run = await startRun([[H0], [H1, H2]], [H0, H1, H2]);
    try {
      const p = await run.producer(run.config(), quiet);
      assert.deepEqual(
        p.shards().map((f) => [f.shard, f.hookPoints]),
        [
          [0, [H0]],
          [1, [H1, H2]],
        ],
      );
      assert.equal(await p.finished, undefined);
      for (const b of run.buffers) assert.deepEqual(b.status().producers, [p.id], "a member of each shard it feeds");
      const rows = Number(p.status().rowsSent) / 3;
      assert.ok(rows > 100, `only ${rows} rows per hook point`);
      await p.stop();

      const [s0, s1] = run.buffers.map((b) => b.status());
      assert.deepEqual(
        s0!.hookPoints.map((h) => h.hookPoint),
        [H0],
      );
      assert.deepEqual(
        s1!.hookPoints.map((h) => h.hookPoint),
        [H1, H2],
      );
      for (const [buffer, hook] of [
        [run.buffers[0]!, H0],
        [run.buffers[1]!, H1],
        [run.buffers[1]!, H2],
      ] as const) {
        const h = pool(buffer, hook);
        // Every row the producer made for the hook point reached its shard once, and is held there.
        assert.equal(Number(h.rowsIn), rows, `${hook}: rows in`);
        assert.equal(Number(h.unconsumedRows), rows, `${hook}: rows held`);
        assert.deepEqual(h.dropped, [], `${hook}: nothing dropped`);
      }
      // Each shard's Demand speaks of its own pools and grants this producer what it sent there.
      for (const [i, hooks] of [[H0], [H1, H2]].entries()) {
        const last = run.demands[i]!.at(-1)!;
        assert.deepEqual(Object.keys(last.freeRows).sort(), [...hooks].sort());
        const granted = Math.max(...run.demands[i]!.map((d) => d.grants[p.id] ?? 0));
        assert.ok(granted >= rows, `shard ${i} granted ${granted} of the ${rows} rows it got`);
      }
    } finally {
      await run.close();
    }
  });

  it("spreads a hook point over two shards: producer 0 pushes it to shard 0, producer 1 to shard 1", async () => {
    const run = await startRun([[H1], [H1]], [H1]);
    try {
      const producers: RunningProducer[] = [];
      for (const shardIndex of [0, 1])
        producers.push(await run.producer(run.config({ shardIndex, shardCount: 2, hookPoints: [H1] }), quiet));
      for (const p of producers) assert.equal(await p.finished, undefined);
      assert.deepEqual(run.buffers[0]!.status().producers, ["producer-0"]);
      assert.deepEqual(run.buffers[1]!.status().producers, ["producer-1"]);
      const sent = producers.map((p) => Number(p.status().rowsSent));
      for (const p of producers) await p.stop();
      for (const i of [0, 1]) {
        assert.ok(sent[i]! > 0);
        assert.equal(rowsIn(run.buffers[i]!, H1), sent[i], `shard ${i} holds producer ${i}'s rows and only those`);
        assert.deepEqual(
          [...new Set(run.demands[i]!.flatMap((d) => Object.keys(d.grants)))],
          [`producer-${i}`],
          `shard ${i} grants only its producer`,
        );
      }
    } finally {
      await run.close();
    }
  });

  it("holds every shard's rows back while one shard pauses: one pass feeds all of them", async () => {
    const run = await startRun([[H0], [H1, H2]], [H0, H1, H2]);
    try {
      run.buffers[0]!.buffer.pause();
      const p = await run.producer(run.config({ epochs: 0 }), quiet);
      await poll(() => p.shards()[1]!.contextsAllowed > 0 && p.shards()[0]!.pausedByBuffer, "shard 1 to grant while shard 0 pauses");
      // Shard 1 grants rows, but a pass for it would make shard 0's rows too: none starts.
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(rowsIn(run.buffers[1]!, H1), 0);
      assert.equal(p.status().pausedByBuffer, true);
      assert.equal(p.status().state, ServiceState.PAUSED);
      run.buffers[0]!.buffer.resume();
      await poll(() => rowsIn(run.buffers[0]!, H0) > 0 && rowsIn(run.buffers[1]!, H2) > 0, "rows on both shards after the resume");
      await p.stop();
    } finally {
      await run.close();
    }
  });

  it("leaves a shard whose trainers are done and goes on feeding the others; ends once every shard it feeds has", async () => {
    // trainer-0 trains H0 (on shard 0), trainer-1 trains H1 (on shard 1): see trainerHookPoints.
    const run = await startRun([[H0, H2], [H1]], [H0, H1, H2], {
      buffer: { trainers: 2, capacityRows: 2048 },
      trainer: { hookPoints: [H0, H1] },
    });
    const trainerDone = subjects("saeflow", run.buffers[0]!.status().runId).trainerDone;
    const done = (trainerId: string, hook: string) => watch.publish(trainerDone, TrainerDone, { trainerId, hookPoints: [hook], step: 1 });
    const said: string[] = [];
    try {
      const p = await run.producer(run.config({ epochs: 0 }), { address: "127.0.0.1:0", log: (line) => said.push(line) });
      await poll(() => rowsIn(run.buffers[0]!, H0) > 0 && rowsIn(run.buffers[1]!, H1) > 0, "rows on both shards");
      done("trainer-0", H0);
      await run.buffers[0]!.finished;
      assert.equal(run.buffers[0]!.buffer.stoppedBecause, "run_ended");
      assert.ok(!run.logs[0]!.some((l) => /did not leave/.test(l)), run.logs[0]!.join("\n"));
      assert.deepEqual(
        p.shards().map((f) => f.ended),
        [true, false],
      );
      // The Demand saying its pools are done and the shard's RunState both tell it: it leaves once.
      assert.equal(said.filter((l) => /leaving buffer shard 0/.test(l)).length, 1, said.join("\n"));
      assert.equal(run.buffers[1]!.status().state, ServiceState.RUNNING, "shard 1's trainer still trains");

      // A trainer reading shard 1 makes room: the producer goes on feeding it alone.
      const client = createClient(BufferService, run.buffers[1]!.address, run.config().transport);
      const reading = (async () => {
        let rows = 0;
        for await (const b of client.batches({ hookPoint: H1, trainerId: "trainer-1", batchSize: 64 }) as AsyncIterable<BatchesResponse>)
          rows += b.activations!.shape[0]!;
        return rows;
      })();
      const before = rowsIn(run.buffers[1]!, H1);
      await poll(() => rowsIn(run.buffers[1]!, H1) > before + 1024, "shard 1 to be fed after shard 0 ended");
      done("trainer-1", H1);
      assert.equal(await p.finished, undefined, "the producer's run is over once every shard it feeds ended");
      await run.buffers[1]!.finished;
      assert.ok((await reading) > 0);
      client.close();
      await p.stop();
    } finally {
      await run.close();
    }
  });

  // A producer feeding shards 0 and 1 starts again after shard 0 ended and its process exited: it
  // must not wait for shard 0's grant (nothing answers there) and goes on feeding shard 1.
  for (const c of [
    {
      name: "restarted after a shard it fed ended, does not wait for that shard (gone) and feeds the others",
      downFirst: false,
      says: /buffer shard\(s\) 0 ended before this start \(the saved position says so\); feeding shard\(s\) 1/,
    },
    {
      name: "down while a shard it fed ended, learns it from another shard's Demand when it starts again, and feeds the others",
      downFirst: true,
      says: /buffer shard 0 ended \(said by buffer shard 1\); leaving it/,
    },
  ]) {
    it(c.name, async () => {
      const run = await startRun([[H0], [H1]], [H0, H1], {
        buffer: { trainers: 2, capacityRows: 2048 },
        trainer: { hookPoints: [H0, H1] },
      });
      const trainerDone = subjects("saeflow", run.buffers[0]!.status().runId).trainerDone;
      const done = (trainerId: string, hook: string) => watch.publish(trainerDone, TrainerDone, { trainerId, hookPoints: [hook], step: 1 });
      const logs: string[] = [];
      const config = run.config({ epochs: 0, resume: true });
      try {
        const first = await run.producer(config, quiet);
        await poll(() => rowsIn(run.buffers[0]!, H0) > 0 && rowsIn(run.buffers[1]!, H1) > 0, "rows on both shards");
        if (c.downFirst) await first.stop();
        done("trainer-0", H0);
        await run.buffers[0]!.finished;
        if (!c.downFirst) {
          await poll(() => first.shards()[0]!.ended, "the producer to leave shard 0");
          await first.stop();
        }
        // Its process exits once it ended: nothing answers on its subjects any more.
        await run.buffers[0]!.stop();
        await poll(() => run.demands[1]!.some((d) => d.endedShards.includes(0)), "shard 1 to say shard 0 ended");

        const again = await run.producer(config, { address: "127.0.0.1:0", log: (line) => logs.push(line) });
        await poll(() => again.shards()[0]!.ended, "the producer started again to leave shard 0");
        assert.ok(
          logs.some((l) => c.says.test(l)),
          logs.join("\n"),
        );
        const reader = await readH1UntilFed(run, "shard 1 to be fed by the producer started again");
        done("trainer-1", H1);
        assert.equal(await again.finished, undefined, "its run is over once shard 1 ended too");
        reader.stop();
        await again.stop();
      } finally {
        await run.close();
      }
    });
  }

  it("leaves a shard where every pool it feeds is done while the shard goes on, so that its other shards are not held back", async () => {
    // Shard 0 holds H0 and H1, shard 1 holds H1: producer 1 pushes H0 to shard 0 and H1 to shard 1.
    // trainer-0 trains H0, trainer-1 trains H1 (trainerHookPoints); once trainer-0 is done, shard 0
    // goes on for H1 but will never grant producer 1 again, whose passes also feed shard 1.
    const run = await startRun([[H0, H1], [H1]], [H0, H1], {
      buffer: { trainers: 2, capacityRows: 2048 },
      trainer: { hookPoints: [H0, H1] },
    });
    const trainerDone = subjects("saeflow", run.buffers[0]!.status().runId).trainerDone;
    try {
      const p = await run.producer(run.config({ epochs: 0, shardIndex: 1, shardCount: 2 }), quiet);
      assert.deepEqual(
        p.shards().map((f) => [f.shard, f.hookPoints]),
        [
          [0, [H0]],
          [1, [H1]],
        ],
      );
      await poll(() => rowsIn(run.buffers[0]!, H0) > 0 && rowsIn(run.buffers[1]!, H1) > 0, "rows on both shards");
      watch.publish(trainerDone, TrainerDone, { trainerId: "trainer-0", hookPoints: [H0], step: 1 });
      await poll(() => p.shards()[0]!.ended, "the producer to leave shard 0");
      assert.equal(run.buffers[0]!.status().state, ServiceState.RUNNING, "shard 0 goes on for H1");
      // A reader of H1 on shard 1 makes room: the producer keeps feeding it.
      (await readH1UntilFed(run, "shard 1 to be fed after the producer left shard 0")).stop();
      await p.stop();
    } finally {
      await run.close();
    }
  });

  it("a shard stopped and restarted from its state file, then ended before the other: each pool's ledger reconciles with what the producer sent it", async () => {
    // trainer-0 reads H0 (shard 0), trainer-1 reads H1 (shard 1); each read by a plain Batches client here.
    const run = await startRun([[H0], [H1]], [H0, H1], { buffer: { trainers: 2, capacityRows: 1024 }, trainer: { hookPoints: [H0, H1] } });
    const trainerDone = subjects("saeflow", run.buffers[0]!.status().runId).trainerDone;
    const done = (trainerId: string, hook: string) => watch.publish(trainerDone, TrainerDone, { trainerId, hookPoints: [hook], step: 1 });
    const transport = run.config().transport;
    /** Reads `hook` from shard `i` as `trainerId` until the shard ends its stream for good, reconnecting across its restart. */
    const read = async (i: number, hook: string, trainerId: string) => {
      for (;;) {
        const client = createClient(BufferService, run.buffers[i]!.address, transport);
        try {
          for await (const _ of client.batches({ hookPoint: hook, trainerId, batchSize: 64 }) as AsyncIterable<BatchesResponse>);
          return;
        } catch {
          await new Promise((r) => setTimeout(r, 100));
        } finally {
          client.close();
        }
      }
    };
    try {
      const p = await run.producer(run.config({ epochs: 0 }), quiet);
      const readers = [read(0, H0, "trainer-0"), read(1, H1, "trainer-1")];
      await poll(() => rowsIn(run.buffers[0]!, H0) > 2048 && rowsIn(run.buffers[1]!, H1) > 2048, "rows flowing to both shards");
      await run.restart(1);
      await poll(() => rowsIn(run.buffers[1]!, H1) > 4096, "shard 1 fed again after its restart");
      assert.ok(
        run.logs[1]!.some((l) => /went on from the ledger/.test(l)),
        run.logs[1]!.join("\n"),
      );

      // Shard 0 ends first: the producer goes on feeding shard 1 alone, and those passes are not shard 0's.
      done("trainer-0", H0);
      await run.buffers[0]!.finished;
      const at = rowsIn(run.buffers[1]!, H1);
      await poll(() => rowsIn(run.buffers[1]!, H1) > at + 2048, "shard 1 fed after shard 0 ended");
      done("trainer-1", H1);
      assert.equal(await p.finished, undefined);
      await Promise.all(readers);

      const feeds = p.shards();
      const perHook = Number(p.status().rowsSent) / 2;
      assert.ok(feeds[0]!.rowsSent[H0]! < perHook, `shard 0 was sent ${feeds[0]!.rowsSent[H0]} of the ${perHook} rows per hook point`);
      assert.equal(feeds[1]!.rowsSent[H1], perHook, "shard 1 was sent every pass");
      for (const [i, hook] of [
        [0, H0],
        [1, H1],
      ] as const) {
        const h = pool(run.buffers[i]!, hook);
        const dropped = Object.fromEntries(h.dropped.map((d) => [d.reason, Number(d.rows)]));
        const refused = (dropped.draining ?? 0) + (dropped.pool_full ?? 0) + (dropped.non_finite ?? 0);
        const lost = (dropped.lost_with_buffer ?? 0) + (dropped.left_at_stop ?? 0);
        const ledger = JSON.stringify({
          shard: i,
          sent: feeds[i]!.rowsSent[hook],
          ...h,
          capacityRows: undefined,
          rowsIn: Number(h.rowsIn),
          rowsOut: Number(h.rowsOut),
          refillCycles: undefined,
          unconsumedRows: Number(h.unconsumedRows),
          dropped,
          trainers: undefined,
        });
        assert.equal(feeds[i]!.rowsSent[hook], Number(h.rowsIn) + refused, `produced = accepted + refused: ${ledger}`);
        assert.equal(Number(h.rowsIn), Number(h.rowsOut) + Number(h.unconsumedRows) + lost, `accepted = served + held + lost: ${ledger}`);
      }
      assert.ok(
        pool(run.buffers[1]!, H1).dropped.some((d) => d.reason === "left_at_stop" && d.rows > 0n),
        "shard 1 held rows when it stopped",
      );
      await p.stop();
    } finally {
      await run.close();
    }
  });
});
