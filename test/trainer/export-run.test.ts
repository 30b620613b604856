import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { RunConfig } from "../../services/common/config/index.js";
import type { RunningServer } from "../../services/common/grpc/server.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { checkpointSteps } from "../../services/trainer/checkpoint.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { startTrainer } from "../../services/trainer/trainer.js";
import { exportRun } from "../../tools/cli/export.js";
import { sparseData, testConfig } from "./fixtures.js";
import { startSyntheticBuffer } from "./synthetic-buffer.js";

const D = 32;
const HOOK = "blocks.2.hook_resid_post";
const rows = sparseData({ d: D, features: 48, active: 3, rows: 2048, batches: 1, seed: "export-fp16" }).batches[0]!;

describe("saeflow export over an fp16 buffer", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-export-run-"));
  let buffer: RunningServer;
  let config: RunConfig;
  before(async () => {
    const base = testConfig(
      root,
      {
        address: "127.0.0.1:0",
        batchSize: 128,
        steps: 30,
        jumprelu: { calibrationTokens: 512 },
        saes: [
          { name: "jump", recipe: "jumprelu", width: 64, k: 4, lr: 0.01 },
          { name: "btk", recipe: "batchtopk", width: 64, k: 4, lr: 0.01 },
        ],
      },
      { hookPoint: HOOK, dModel: D },
    );
    buffer = await startSyntheticBuffer({ config: base, hookPoint: HOOK, dModel: D, rows, dtype: DType.FP16 });
    config = {
      ...base,
      buffer: { ...base.buffer, address: buffer.address, dtype: "fp16" },
    };
  });
  after(async () => {
    await buffer.close(100);
    rmSync(root, { recursive: true, force: true });
  });

  test("JumpReLU and BatchTopK SAEs trained on fp16 batches export from their checkpoints, JumpReLU calibrated on fp16", async () => {
    const trainer = await startTrainer(config, { log: () => undefined });
    assert.equal(await trainer.finished, undefined);
    await trainer.stop();
    assert.deepEqual(checkpointSteps(join(root, "jump", "checkpoints")), [30]);

    const lines: string[] = [];
    const exports = await exportRun(config, [root], (line) => lines.push(line));
    assert.deepEqual(exports, [join(root, "jump", "sae_lens"), join(root, "btk", "sae_lens")]);
    assert.ok(!lines.some((l) => /does not answer/.test(l)), lines.join("\n"));
    for (const dir of exports) {
      const exp = loadSaeLens(dir);
      assert.equal(exp.cfg.architecture, "jumprelu");
      assert.equal(exp.cfg.d_sae, 64);
      assert.equal((exp.cfg.saeflow as { steps: number }).steps, 30);
      const threshold = exp.tensors.threshold!.data as Float32Array;
      assert.equal(threshold.length, 64);
      assert.ok(
        threshold.every((v) => Number.isFinite(v) && v > 0),
        `${dir}: thresholds finite and positive, min ${Math.min(...threshold)}`,
      );
    }
  });
});
