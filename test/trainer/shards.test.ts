import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import type { RunConfig } from "../../services/common/config/index.js";
import { subjects, TrainerDone } from "../../services/common/coordination.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import type { RunningServer } from "../../services/common/grpc/server.js";
import { connectBus } from "../../services/common/nats.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { ArrayBatchSource, type Batch, type BatchSource } from "../../services/trainer/batches.js";
import { checkpointSteps } from "../../services/trainer/checkpoint.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { MergedBatches } from "../../services/trainer/merged.js";
import { bufferSource } from "../../services/trainer/sources.js";
import { startTrainer } from "../../services/trainer/trainer.js";
import { freePort, startNatsServer } from "../../tools/cli/nats-server.js";
import { gaussianBatch, testConfig } from "./fixtures.js";
import { startSyntheticBuffer } from "./synthetic-buffer.js";

// A trainer process of several hook points, each read from every buffer shard holding it: real gRPC
// (synthetic buffers that serve known rows), real NATS for the one TrainerDone, real ORT steps.
const A = "blocks.0.hook_resid_post";
const B = "blocks.1.hook_mlp_out";
const [DA, DB] = [16, 24];
const root = mkdtempSync(join(tmpdir(), "saeflow-trainer-shards-"));
after(() => rmSync(root, { recursive: true, force: true }));

/** Rows of width d around `mean` in every coordinate. */
const around = (rows: number, d: number, mean: number, seed: string) => gaussianBatch(rows, d, seed).map((v) => v + mean);

/** Rows whose first coordinate names where they came from: shard * 1e4 + row index. */
function marked(rows: number, d: number, shard: number): Float32Array {
  const out = gaussianBatch(rows, d, `shard-${shard}`);
  for (let r = 0; r < rows; r++) out[r * d] = shard * 1e4 + r;
  return out;
}
const shardOf = (b: Batch) => Math.floor((b.data as Float32Array)[0]! / 1e4);

const batch = (tag: number): Batch => ({ data: Float32Array.of(tag), dtype: "fp32", rows: 1, dModel: 1, traceparent: "" });

describe("batches of one hook point merged from several sources", () => {
  test("takes whichever source has a batch; one that ends drops out, the merge ends when all have", async () => {
    const merged = new MergedBatches([new ArrayBatchSource([1, 2, 3].map(batch)), new ArrayBatchSource([10, 20, 30, 40, 50].map(batch))]);
    const tags: number[] = [];
    for (let b = await merged.next(); b; b = await merged.next()) tags.push((b.data as Float32Array)[0]!);
    assert.deepEqual(
      [...tags].sort((x, y) => x - y),
      [1, 2, 3, 10, 20, 30, 40, 50],
    );
    assert.deepEqual(tags.slice(0, 4), [1, 10, 2, 20], "sources with batches ready take turns");
    assert.equal(await merged.next(), undefined);
  });

  test("a source that holds its batch back does not stall the others; one that fails fails the merge", async () => {
    let closed = 0;
    const stalled: BatchSource = { next: () => new Promise(() => undefined), close: () => void closed++ };
    const merged = new MergedBatches([stalled, new ArrayBatchSource([1, 2, 3].map(batch))]);
    for (const want of [1, 2, 3]) assert.equal(((await merged.next())!.data as Float32Array)[0], want);
    merged.close();
    assert.equal(await merged.next(), undefined);
    assert.equal(closed, 1, "close() closes every source");

    const failing: BatchSource = { next: () => Promise.reject(new Error("shard gone for good")), close: () => undefined };
    await assert.rejects(new MergedBatches([failing, new ArrayBatchSource([])]).next(), /shard gone for good/);
  });
});

describe("a trainer process over buffer shards", { timeout: 120_000 }, () => {
  test("a hook point spread over 2 shards gets rows from both; a shard stopped and started again does not stop the other's", async () => {
    const config0 = testConfig(root, { batchSize: 32 }, { hookPoint: A, dModel: DA });
    const addresses = [`127.0.0.1:${await freePort()}`, `127.0.0.1:${await freePort()}`];
    const shard = (i: number, mark: number) =>
      startSyntheticBuffer({
        config: config0,
        address: addresses[i],
        hookPoint: A,
        dModel: DA,
        rows: marked(256, DA, mark),
        dtype: DType.FP32,
      });
    const servers: RunningServer[] = [await shard(0, 0), await shard(1, 1)];
    const config: RunConfig = {
      ...config0,
      buffer: { ...config0.buffer, shards: addresses.map((address) => ({ address, hookPoints: [A] })), trainerAwayMs: 30_000 },
    };
    const lines: string[] = [];
    const source = await bufferSource(config, A, (l) => lines.push(l));
    const seen: number[] = [];
    /** Takes batches until `done` holds of the shards they came from (2: shard 0 started again), for up to 30 s. */
    const takeUntil = async (done: () => boolean) => {
      for (const until = Date.now() + 30_000; !done() && Date.now() < until;) seen.push(shardOf((await source.next())!));
      return done();
    };
    try {
      // Either shard's stream may open first: the other's rows come once it is open.
      assert.ok(await takeUntil(() => seen.includes(0) && seen.includes(1)), `rows from both shards: ${seen.join(",")}`);

      await servers[0]!.close(100);
      // What shard 0 had sent still comes; then shard 1's rows go on while shard 0 is away.
      const at = seen.length;
      const runOfOnes = () => seen.length - at >= 20 && seen.slice(-20).every((s) => s === 1);
      assert.ok(await takeUntil(runOfOnes), `only shard 1 while shard 0 is down: ${seen.slice(at).join(",")}`);

      servers[0] = await shard(0, 2);
      assert.ok(await takeUntil(() => seen.includes(2)), "shard 0's rows again once it is back");
      const back = seen.indexOf(2);
      assert.ok(await takeUntil(() => seen.slice(back).includes(1)), "and shard 1's rows along with them");
    } finally {
      source.close();
      for (const s of servers) await s.close(100);
    }
    assert.ok(
      lines.some((l) => l.startsWith(`stream of ${A} from the buffer at ${addresses[0]} lost`)),
      lines.join("\n"),
    );
    assert.ok(
      lines.some((l) => l.startsWith(`stream of ${A} from the buffer at ${addresses[0]} back after`)),
      lines.join("\n"),
    );
  });

  test("one process trains 2 hook points side by side: its own folders, rows and widths each, one Status, one TrainerDone per hook point", async () => {
    const nats = await startNatsServer();
    const dir = join(root, "two");
    // A is on both shards, B on shard 1 only; A's rows sit around +4, B's around -4.
    const pools = [
      { name: A, dModel: DA },
      { name: B, dModel: DB },
    ];
    const rowsA = around(512, DA, 4, "a");
    const rowsB = around(512, DB, -4, "b");
    const base = testConfig(root, {}, { pools });
    const servers = [
      await startSyntheticBuffer({ config: base, pools: [{ hookPoint: A, dModel: DA, rows: rowsA }], dtype: DType.FP32 }),
      await startSyntheticBuffer({
        config: base,
        pools: [
          { hookPoint: A, dModel: DA, rows: rowsA },
          { hookPoint: B, dModel: DB, rows: rowsB },
        ],
        dtype: DType.FP32,
      }),
    ];
    const shards = [
      { address: servers[0]!.address, hookPoints: [A] },
      { address: servers[1]!.address, hookPoints: [A, B] },
    ];
    const config = testConfig(
      dir,
      {
        address: "127.0.0.1:0",
        batchSize: 64,
        steps: 25,
        logEvery: 5,
        exportOnFinish: true,
        saes: [{ name: "s", width: 32, k: 4, lr: 0.001 }],
      },
      { pools, shards },
    );
    config.nats = { ...config.nats, url: nats.url };
    config.run = { ...config.run, id: "two-hooks" };
    const bus = await connectBus({ url: nats.url, name: "watch" });
    const done: TrainerDone[] = [];
    bus.subscribe(subjects(config.nats.subjectPrefix, config.run.id).trainerDone, TrainerDone, (m) => done.push(m));
    await bus.flush();
    const lines: string[] = [];
    const trainer = await startTrainer(config, { log: (l) => lines.push(l) });
    const client = createClient(TrainerService, trainer.address, config.transport);
    try {
      assert.match(
        lines[0]!,
        new RegExp(`training 1 SAE\\(s\\) on each of ${A}, ${B} from ${servers[0]!.address}, ${servers[1]!.address}`),
      );
      assert.equal(await trainer.ready, true);
      const st = await client.status({});
      assert.deepEqual(st.hookPoints, [A, B]);
      assert.deepEqual(
        st.saes.map((s) => [s.hookPoint, s.name]),
        [
          [A, "s"],
          [B, "s"],
        ],
      );
      assert.equal(st.runDir, dir);
      assert.equal(await trainer.finished, undefined);
      const final = trainer.status();
      assert.equal(final.state, ServiceState.STOPPED);
      assert.deepEqual(
        final.saes.map((s) => Number(s.step)),
        [25, 25],
      );
      for (const [hook, d, mean] of [
        [A, DA, 4],
        [B, DB, -4],
      ] as const) {
        assert.ok(checkpointSteps(join(dir, hook, "s", "checkpoints")).includes(25), `${hook}'s checkpoints in its folder`);
        const exp = loadSaeLens(join(dir, hook, "s", "sae_lens"));
        assert.equal(exp.cfg.d_in, d, `${hook} is trained at its pool's width`);
        assert.equal(exp.cfg.hook_name, hook);
        // b_dec starts at the mean of the first batches: only this hook point's rows were there.
        const bDec = exp.tensors.b_dec!.data as Float32Array;
        const avg = bDec.reduce((a, v) => a + v, 0) / d;
        assert.ok(Math.abs(avg - mean) < 0.5, `${hook}: b_dec averages ${avg}, its rows ${mean}`);
      }
      assert.ok(!existsSync(join(dir, "s")), "no SAE folder outside the hook points' folders");
      assert.ok(lines.some((l) => l.startsWith(`${A}: stopped at step 25`)) && lines.some((l) => l.startsWith(`${B}: stopped at step 25`)));
      for (const until = Date.now() + 5000; done.length < 2 && Date.now() < until;) await new Promise((r) => setTimeout(r, 50));
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(
        done.sort((a, b) => a.hookPoints[0]!.localeCompare(b.hookPoints[0]!)),
        [A, B].sort().map((hook) => ({ trainerId: config.trainer.id, hookPoints: [hook], step: 25 })),
        "each hook point announced once, as its training ended",
      );
    } finally {
      client.close();
      await trainer.stop();
      await bus.drain();
      for (const s of servers) await s.close(100);
      await nats.stop();
    }
  });
});
