import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { ConfigError, type RunConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import type { RunningServer } from "../../services/common/grpc/server.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { checkBufferPool } from "../../services/trainer/batches.js";
import { checkpointPath, checkpointSteps } from "../../services/trainer/checkpoint.js";
import { loadSaeLens } from "../../services/trainer/export.js";
import { startTrainer } from "../../services/trainer/trainer.js";
import { OtlpReceiver } from "../support/otlp-receiver.js";
import { readJsonl, sparseData, testConfig, type TestPools } from "./fixtures.js";
import { startSyntheticBuffer } from "./synthetic-buffer.js";

const D = 32;
const HOOK = "blocks.3.hook_resid_post";
const rows = sparseData({ d: D, features: 48, active: 3, rows: 4096, batches: 1, seed: "grpc" }).batches[0]!;

/** Polls `probe` until it holds; the test's own timeout bounds the wait. */
async function until<T>(probe: () => Promise<T>, ok: (v: T) => boolean): Promise<T> {
  for (;;) {
    const v = await probe();
    if (ok(v)) return v;
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe("trainer over gRPC", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-trainer-grpc-"));
  let buffer: RunningServer;
  let base: RunConfig;
  before(async () => {
    base = testConfig(root, {});
    // bf16 on the wire: the trainer widens it to fp32 before the step graphs.
    buffer = await startSyntheticBuffer({ config: base, hookPoint: HOOK, dModel: D, rows, dtype: DType.BF16 });
  });
  after(async () => {
    await buffer.close(100);
    rmSync(root, { recursive: true, force: true });
  });

  const config = (dir: string, over: Record<string, unknown> = {}, pools: TestPools = {}) =>
    testConfig(dir, { address: "127.0.0.1:0", batchSize: 128, ...over }, { address: buffer.address, hookPoint: HOOK, dModel: D, ...pools });

  test("a pool of another width or a missing hook point is refused naming the key at fault", async () => {
    const client = createClient(BufferService, buffer.address, base.transport);
    try {
      await checkBufferPool(client, config(join(root, "ok")));
      await assert.rejects(checkBufferPool(client, config(join(root, "w"), {}, { dModel: 64 })), (e: unknown) => {
        assert.ok(e instanceof ConfigError);
        assert.deepEqual(e.keys, ["buffer.hookPoints.0.dModel"]);
        assert.match(e.message, new RegExp(`64 for ${HOOK}, but the buffer at ${buffer.address} holds rows of width ${D}`));
        return true;
      });
      await assert.rejects(
        checkBufferPool(client, config(join(root, "h"), {}, { hookPoint: "blocks.9.hook_mlp_out" })),
        (e: unknown) => e instanceof ConfigError && e.keys[0] === "trainer.hookPoints.0",
      );
    } finally {
      client.close();
    }
  });

  test("trains a sweep from the buffer's stream and answers status, pause, resume, checkpoint and stop", async () => {
    const dir = join(root, "sweep");
    const cfg = config(dir, {
      steps: 1_000_000,
      logEvery: 5,
      checkpointEvery: 0,
      jumprelu: { calibrationTokens: 256 },
      saes: [
        { name: "topk", recipe: "topk", width: 96, k: 3, lr: 0.01 },
        { name: "jump", recipe: "jumprelu", width: 64, k: 4, lr: 0.01 },
      ],
    });
    const lines: string[] = [];
    const trainer = await startTrainer(cfg, { log: (line) => lines.push(line) });
    assert.match(
      lines[0]!,
      new RegExp(`serving control RPCs on ${trainer.address}; training 2 SAE\\(s\\) on each of ${HOOK} from ${buffer.address}`),
    );
    const client = createClient(TrainerService, trainer.address, cfg.transport);
    const health = createClient(Health, trainer.address, cfg.transport);
    try {
      const st = await until(
        () => client.status({}),
        (s) => s.saes.every((x) => x.step >= 10n),
      );
      assert.equal(st.state, ServiceState.RUNNING);
      assert.deepEqual(st.hookPoints, [HOOK]);
      assert.deepEqual(
        st.saes.map((s) => s.hookPoint),
        [HOOK, HOOK],
      );
      assert.equal(st.runDir, dir);
      assert.deepEqual(
        st.saes.map((s) => [s.name, s.recipe]),
        [
          ["topk", "topk"],
          ["jump", "jumprelu"],
        ],
      );
      assert.equal(st.saes[0]!.l0, 3);
      assert.equal(st.saes[1]!.l0, 4);
      assert.ok(st.saes.every((s) => s.tokens >= 10n * 128n && s.tokensPerSecond > 0 && s.mse > 0 && s.learningRate > 0));
      assert.equal(await trainer.ready, true);
      assert.equal((await health.check({ service: "" })).status, Serving.SERVING);

      assert.equal((await client.pause({})).state, ServiceState.PAUSED);
      const pausedAt = (await client.status({})).saes[0]!.step;
      const ckpt = await client.checkpoint({});
      assert.equal(ckpt.step, pausedAt);
      assert.equal(ckpt.paths.length, 2);
      assert.ok(ckpt.paths.every((p) => existsSync(p)));
      await new Promise((r) => setTimeout(r, 200));
      assert.equal((await client.status({})).saes[0]!.step, pausedAt, "no step while paused");

      assert.equal((await client.resume({})).state, ServiceState.RUNNING);
      await until(
        () => client.status({}),
        (s) => s.saes[0]!.step > pausedAt,
      );

      const stopped = await client.stop({});
      assert.equal(stopped.checkpoints.length, 2);
      assert.equal(stopped.exports.length, 2);
      assert.equal(await trainer.finished, undefined);
      const final = trainer.status();
      assert.equal(final.state, ServiceState.STOPPED);
      assert.deepEqual({ ...(await client.status({})), wallMs: 0 }, { ...final, wallMs: 0 }, "status() is what Status answers");
      assert.deepEqual(checkpointSteps(join(dir, "topk", "checkpoints")).at(-1), Number(final.saes[0]!.step));
      assert.deepEqual(
        stopped.checkpoints,
        [join(dir, "topk", "checkpoints"), join(dir, "jump", "checkpoints")].map((d) => checkpointPath(d, Number(final.saes[0]!.step))),
      );
      assert.equal(loadSaeLens(join(dir, "topk", "sae_lens")).cfg.architecture, "topk");
      const jump = loadSaeLens(join(dir, "jump", "sae_lens"));
      assert.equal(jump.cfg.architecture, "jumprelu");
      assert.ok((jump.tensors.threshold!.data as Float32Array).every((v) => v > 0));
      assert.ok(readJsonl(join(dir, "jump", "metrics.jsonl")).length >= 2);
    } finally {
      client.close();
      health.close();
      await trainer.stop();
    }
    assert.ok(
      lines.some((l) => /stopped at step \d+/.test(l)),
      "the role's lines go to deps.log",
    );
  });

  test("main.ts trains, serves its control RPCs, traces its steps, and checkpoints on SIGTERM", async () => {
    const dir = join(root, "main");
    const otlp = new OtlpReceiver();
    const endpoint = await otlp.start();
    const file = join(root, "trainer.yaml");
    writeFileSync(
      file,
      [
        `run: { dir: ${dir} }`,
        `buffer: { address: "${buffer.address}", hookPoints: [{ name: ${HOOK}, dModel: ${D} }] }`,
        `producer: { hookPoints: [${HOOK}] }`,
        "trainer:",
        '  address: "127.0.0.1:0"',
        `  hookPoints: [${HOOK}]`,
        "  batchSize: 128",
        "  steps: 1000000",
        "  threads: 1",
        "  saes: [{ name: s, width: 64, k: 4, lr: 0.01 }]",
      ].join("\n"),
    );
    const child = spawn(
      process.execPath,
      [
        "--import",
        "tsx",
        "services/trainer/main.ts",
        "--config",
        file,
        "--set",
        "trainer.logEvery=2",
        "--set",
        `telemetry.otlpEndpoint=${endpoint}`,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (out += b.toString()));
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    const address = await until(
      async () => /serving control RPCs on (\S+);/.exec(out)?.[1],
      (a) => a !== undefined || child.exitCode !== null,
    );
    assert.ok(address, `main.ts did not start: ${out}`);
    const client = createClient(TrainerService, address, base.transport);
    try {
      await until(
        () => client.status({}),
        (s) => s.saes[0]!.step >= 3n,
      );
    } finally {
      client.close();
    }
    child.kill("SIGTERM");
    assert.equal(await exited, 0, out);
    assert.match(out, /stopped at step \d+/);
    assert.ok(checkpointSteps(join(dir, "s", "checkpoints")).length > 0);
    assert.ok(!existsSync(join(dir, "s", "sae_lens")), "a signal checkpoints but does not export");
    await otlp.stop();
    const steps = otlp.spans.filter((s) => s.name === "trainer.step");
    assert.ok(steps.length >= 3, "train steps are traced");
    assert.ok(steps.every((s) => s.service === "saeflow-trainer" && s.attributes.rows === 128));
    assert.ok(otlp.spans.some((s) => s.name === "trainer.checkpoint"));
  });

  test("main.ts refuses a pool width the live buffer does not serve, naming buffer.hookPoints", async () => {
    const child = spawn(
      process.execPath,
      // The file agrees with itself (the loader checks that); the live buffer serves width 32.
      [
        "--import",
        "tsx",
        "services/trainer/main.ts",
        "--set",
        `buffer.address=${buffer.address}`,
        "--set",
        `trainer.hookPoints=[${HOOK}]`,
        "--set",
        `buffer.hookPoints=[{name: ${HOOK}, dModel: 48}]`,
        "--set",
        `producer.hookPoints=[${HOOK}]`,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let err = "";
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
    assert.equal(code, 2);
    assert.match(
      err,
      new RegExp(`buffer\\.hookPoints\\.0\\.dModel: 48 for ${HOOK}, but the buffer at ${buffer.address} holds rows of width ${D}`),
    );
  });
});
