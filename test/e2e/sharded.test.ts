import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { loadConfig } from "../../services/common/config/index.js";
import { saeFolder } from "../../services/common/sae-folders.js";
import { trainerHookPoints } from "../../services/common/shards.js";
import type { HookLedger } from "../../tools/cli/ledger.js";
import type { RunEvent } from "../../tools/cli/supervise.js";
import { figure, readJsonl, readRunFile, spawnUp, untilStep } from "../faults/support.js";

// Llama Scope's layout at toy scale through `saeflow up`: deploy/configs/sharded-local.yaml (2 buffer
// shards x 2 producers x 3 trainers x 4 hook points, one hook point spread over both shards), with
// shard 1 killed once mid-run. The run ends by itself; every SAE trained its hook point's rows only,
// every (shard, hook point) ledger reconciles, and the shard's restart did not disturb readers of
// the other shard.
const CONFIG = "deploy/configs/sharded-local.yaml";
const STEPS = 300;
const SAE = "topk-k8";

describe("a sharded run: 2 buffer shards x 2 producers x 3 trainers x 4 hook points", { timeout: 420_000 }, () => {
  const base = mkdtempSync(join(tmpdir(), "saeflow-sharded-"));
  let passed = false;
  // A failed run's folder is kept, logs and all, and named in the failure.
  after(() => passed && rmSync(base, { recursive: true, force: true }));

  it("runs to the end through a shard's kill -9, each trainer on its own hook points, every shard's ledger reconciled", async () => {
    const runDir = join(base, "run");
    const sets = [
      `run.dir=${runDir}`,
      "launch.evaluate=false",
      "launch.report=false",
      "launch.statusEveryMs=500",
      `trainer.steps=${STEPS}`,
    ];
    const started = performance.now();
    const { exited, output } = spawnUp(CONFIG, sets);
    await untilStep(runDir, 100, exited);
    const run = readRunFile(runDir);
    const shard1 = run.services.find((s) => s.id === "buffer-1")!;
    process.kill(shard1.pid, "SIGKILL");
    // A run that hangs fails here with what it printed, rather than at the suite's timeout.
    const code = await Promise.race([
      exited,
      new Promise<string>((r) => setTimeout(() => r("still running after 300 s"), 300_000).unref()),
    ]);
    const seconds = (performance.now() - started) / 1000;
    assert.equal(code, 0, `${output()}\n(run folder kept: ${runDir})`);
    figure(`sharded-local (${STEPS} steps) with buffer-1 killed at step 100: ${seconds.toFixed(0)} s`);

    // run.json lists the buffers, one per shard, with the pools each holds.
    const config = loadConfig({ file: join(runDir, "run.yaml") });
    assert.deepEqual(
      readRunFile(runDir).buffers.map((b) => [b.id, b.shard, b.hookPoints]),
      [
        ["buffer-0", 0, ["blocks.0.hook_resid_post", "blocks.1.hook_attn_out", "blocks.1.hook_resid_post"]],
        ["buffer-1", 1, ["blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"]],
      ],
    );

    // Only the killed shard was restarted, once.
    const events = readJsonl<RunEvent>(join(runDir, "events.jsonl"));
    assert.deepEqual(
      events.map((e) => `${e.who} ${e.event}`),
      ["buffer-1 exited", "buffer-1 restarted", "buffer-1 serving"],
    );
    // Trainer 1 reads only shard 0: its stream never broke.
    assert.deepEqual(trainerHookPoints(config.trainer, 1, 3), ["blocks.1.hook_attn_out"]);
    assert.doesNotMatch(readFileSync(join(runDir, "logs", "trainer-1.log"), "utf8"), /from the buffer at \S+ lost/);

    // Every SAE trained to the end on its own hook point, and says so in its SAELens export.
    for (let i = 0; i < 3; i++) {
      for (const hook of trainerHookPoints(config.trainer, i, 3)) {
        const dir = saeFolder(runDir, config.trainer, hook, SAE);
        const cfg = JSON.parse(readFileSync(join(dir, "sae_lens", "cfg.json"), "utf8")) as { hook_name: string };
        assert.equal(cfg.hook_name, hook);
        const last = readJsonl<{ step: number }>(join(dir, "metrics.jsonl")).at(-1);
        assert.equal(last?.step, STEPS, `${hook}/${SAE}`);
      }
    }
    const final = JSON.parse(readFileSync(join(runDir, "final-status.json"), "utf8")) as {
      trainers: Array<{ id: string; status: { hookPoints: string[]; saes: Array<{ hookPoint: string; step: string }> } }>;
      ledger: HookLedger[];
    };
    for (const t of final.trainers) {
      const i = Number(t.id.split("-")[1]);
      assert.deepEqual(t.status.hookPoints, trainerHookPoints(config.trainer, i, 3), t.id);
      assert.deepEqual(
        t.status.saes.map((s) => s.hookPoint),
        t.status.hookPoints,
      );
    }

    // The ledger per (shard, hook point): the spread hook point has a pool on each shard.
    assert.deepEqual(
      final.ledger.map((l) => `${l.shard} ${l.hookPoint}`),
      [
        "0 blocks.0.hook_resid_post",
        "0 blocks.1.hook_attn_out",
        "0 blocks.1.hook_resid_post",
        "1 blocks.1.hook_mlp_out",
        "1 blocks.1.hook_resid_post",
      ],
    );
    for (const l of final.ledger) {
      assert.ok(l.producedReconciles && l.acceptedReconciles, JSON.stringify(l));
      assert.ok(l.accepted > 0, JSON.stringify(l));
    }
    // The rows its pool held when it was killed are counted, not lost silently.
    assert.ok(
      final.ledger.filter((l) => l.shard === 1).some((l) => (l.lost.lost_with_buffer ?? 0) > 0),
      JSON.stringify(final.ledger),
    );
    assert.ok(existsSync(join(runDir, "buffer-1.state.json")) && existsSync(join(runDir, "buffer-0.state.json")));
    passed = true;
  });
});
