import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { promisify } from "node:util";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { exportSaeLens } from "../../services/trainer/export.js";
import { SaeRun } from "../../services/trainer/sae-run.js";
import { hookConfig } from "../../services/trainer/hook.js";
import { allocState } from "../../services/trainer/sae.js";
import { runCli } from "../../tools/eval/main.js";
import { EVAL_FILE, evaluateRun, exportDir } from "../../tools/eval/run.js";
import type { SpliceResult } from "../../tools/eval/splice.js";
import { identitySae, tinyLlama, zeroSae } from "./fixtures.js";

const repo = join(import.meta.dirname, "../..");
const HOOK = "blocks.1.hook_resid_post";

/** runCli with its output captured. */
async function cli(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = "";
  let err = "";
  const code = await runCli(args, { out: (t) => (out += t), err: (t) => (err += t) });
  return { code, out, err };
}

describe("eval CLI and run evaluation", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-eval-cli-"));
  after(() => rmSync(root, { recursive: true, force: true }));
  const tiny = tinyLlama();
  const d = tiny.params.dModel;
  const identity = identitySae(join(root, "identity"), HOOK, d);

  test("prints a row per SAE and writes them as a JSON array to --out", async () => {
    const out = join(root, "eval.json");
    const zero = zeroSae(join(root, "zero"), HOOK, d);
    const res = await cli([
      "--model",
      tiny.modelPath,
      "--sae",
      identity,
      "--sae",
      zero,
      "--contexts",
      "2",
      "--context-length",
      "16",
      "--out",
      out,
    ]);
    assert.equal(res.code, 0, res.err);
    assert.match(res.out, /recovered/);
    assert.match(res.out, /2 SAE\(s\), 2 contexts of 16 tokens/);
    const rows = JSON.parse(readFileSync(out, "utf8")) as SpliceResult[];
    assert.deepEqual(
      rows.map((r) => [r.sae, r.hook, r.fraction_loss_recovered]),
      [
        [identity, HOOK, 1],
        [zero, HOOK, 0],
      ],
    );
    assert.equal(rows[1]!.relative_reconstruction_bias, null, "an undefined ratio is null in JSON");
  });

  test("a trained JumpReLU's export evaluates: thresholds at zero keep the identity, thresholds above every activation ablate", async () => {
    const config = RunConfigSchema.parse({
      run: { dir: join(root, "jrt-run") },
      producer: { model: tiny.modelPath, contextLength: 16 },
      buffer: { hookPoints: [{ name: HOOK, dModel: d }] },
      trainer: { hookPoints: [HOOK], saes: [{ name: "jrt", recipe: "jumprelu_trained", width: 2 * d }] },
    });
    const recovered: number[] = [];
    for (const theta of [-1, 1e9]) {
      // The identity SAE's weights as jumprelu_trained holds them, exported through the trainer's own path.
      const state = allocState(2 * d, d, "jumprelu_trained");
      for (let i = 0; i < d; i++) {
        state.W_enc[i * d + i] = state.W_dec[i * d + i] = 1;
        state.W_enc[(d + i) * d + i] = state.W_dec[(d + i) * d + i] = -1;
      }
      state.threshold!.fill(theta);
      const run = new SaeRun(config.trainer.saes[0]!, 0, join(root, `jrt-${theta}`), 0, hookConfig(config, HOOK));
      const info = run.exportInfo(config, { step: 1, tokens: 1, scale: 1 }, state);
      const dir = exportSaeLens(run.exportDir, state, 2 * d, d, info);
      const res = await cli([
        "--model",
        tiny.modelPath,
        "--sae",
        dir,
        "--contexts",
        "2",
        "--context-length",
        "16",
        "--out",
        join(root, `jrt-${theta}.json`),
      ]);
      assert.equal(res.code, 0, res.err);
      const [row] = JSON.parse(readFileSync(join(root, `jrt-${theta}.json`), "utf8")) as SpliceResult[];
      recovered.push(row!.fraction_loss_recovered!);
    }
    assert.deepEqual(recovered, [1, 0]);
  });

  test("refuses a missing --sae folder, naming the flag", async () => {
    const missing = join(root, "nope");
    const res = await cli(["--model", tiny.modelPath, "--sae", missing]);
    assert.equal(res.code, 2);
    assert.equal(res.err, `eval: --sae ${missing}: no such folder\n`);
    const none = await cli(["--model", tiny.modelPath]);
    assert.equal(none.code, 2);
    assert.match(none.err, /--sae: give at least one SAELens export folder/);
  });

  test("refuses a folder that is not an export, and an SAE whose hook the model lacks, naming flag and hook", async () => {
    const empty = join(root, "empty");
    mkdirSync(empty);
    const notExport = await cli(["--model", tiny.modelPath, "--sae", empty]);
    assert.equal(notExport.code, 2);
    assert.match(notExport.err, new RegExp(`^eval: --sae ${empty}: no cfg\\.json here`));

    const beyond = identitySae(join(root, "beyond"), "blocks.9.hook_resid_post", d);
    const res = await cli(["--model", tiny.modelPath, "--sae", beyond, "--contexts", "1", "--context-length", "8"]);
    assert.equal(res.code, 2);
    assert.match(res.err, new RegExp(`^eval: --sae ${beyond}: cfg\\.json hook_name "blocks\\.9\\.hook_resid_post" is not a hook point`));
    assert.match(res.err, /layer 9 is beyond the model, which has 2 layers/);
  });

  test("refuses a missing --model and a bad --contexts, naming the flag", async () => {
    const model = join(root, "none.onnx");
    const res = await cli(["--model", model, "--sae", identity]);
    assert.equal(res.code, 2);
    assert.match(res.err, new RegExp(`^eval: --model ${model}: no such file`));
    const bad = await cli(["--model", tiny.modelPath, "--sae", identity, "--contexts", "0"]);
    assert.equal(bad.code, 2);
    assert.match(bad.err, /--contexts: expected a positive integer, got "0"/);
  });

  test("the command itself exits 2 with the message on stderr", async () => {
    const missing = join(root, "gone");
    const run = promisify(execFile)(process.execPath, ["--import", "tsx", "tools/eval/main.ts", "--sae", missing], { cwd: repo });
    await assert.rejects(
      run,
      (err: { code: number; stderr: string }) => err.code === 2 && err.stderr.includes(`--sae ${missing}: no such folder`),
    );
  });

  test("evaluateRun finds the run's exports, skips an SAE without one, and writes eval.json named by SAE", async () => {
    const runDir = join(root, "run");
    identitySae(exportDir(join(runDir, "id")), HOOK, d);
    const config = RunConfigSchema.parse({
      run: { dir: runDir },
      producer: { model: tiny.modelPath, contextLength: 16 },
      trainer: { hookPoints: [HOOK], saes: [{ name: "id" }, { name: "never-exported" }] },
      launch: { evalContexts: 2 },
    });
    const lines: string[] = [];
    const rows = await evaluateRun(runDir, config, { log: (line) => lines.push(line) });
    assert.deepEqual(
      rows.map((r) => [r.sae, r.fraction_loss_recovered]),
      [["id", 1]],
    );
    assert.ok(lines.some((l) => l.includes("no export for never-exported")));
    assert.ok(existsSync(join(runDir, EVAL_FILE)));
    assert.deepEqual(JSON.parse(readFileSync(join(runDir, EVAL_FILE), "utf8")), JSON.parse(JSON.stringify(rows)));

    const empty = RunConfigSchema.parse({ ...config, trainer: { saes: [{ name: "never-exported" }] } });
    await assert.rejects(evaluateRun(runDir, empty), /no SAE of the run has an export/);
  });

  test("a run of several hook points keeps each hook point's sweep in its own folder, and names its rows by hook point", async () => {
    const runDir = join(root, "run-hooks");
    const other = "blocks.0.hook_resid_post";
    for (const hook of [HOOK, other]) identitySae(exportDir(join(runDir, hook, "id")), hook, d);
    const config = RunConfigSchema.parse({
      run: { dir: runDir },
      buffer: {
        hookPoints: [
          { name: HOOK, dModel: d },
          { name: other, dModel: d },
        ],
      },
      producer: { model: tiny.modelPath, contextLength: 16, hookPoints: [HOOK, other] },
      trainer: { hookPoints: [HOOK, other], saes: [{ name: "id" }] },
      launch: { evalContexts: 2 },
    });
    const rows = await evaluateRun(runDir, config);
    assert.deepEqual(
      rows.map((r) => [r.sae, r.hook, r.fraction_loss_recovered]),
      [
        [`${HOOK}/id`, HOOK, 1],
        [`${other}/id`, other, 1],
      ],
    );
  });
});
