import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { longPassWarning } from "../../services/producer/produce.js";
import { openModelSession } from "../../services/producer/model-thread.js";
import type { ForwardInputs } from "../../services/producer/session.js";
import { useSwiftShader } from "../trainer/webgpu.js";
import { tinyModel } from "./harness.js";

// WebGPU runs on SwiftShader (Vulkan on the CPU), the same device on every machine.
useSwiftShader();

describe("model session", () => {
  const model = tinyModel().modelPath;

  it("cuts the model after the hook points and runs them all in one pass on CPU with the configured threads", async () => {
    const s = await openModelSession({
      model,
      hookPoints: ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"],
      provider: "cpu",
      threads: 1,
    });
    assert.equal(s.dModel, 64);
    assert.equal(s.vocabSize, 128256);
    const out = await s.run({
      batch: 1,
      length: 3,
      inputIds: new BigInt64Array([128000n, 9906n, 1917n]),
      attentionMask: new BigInt64Array(3).fill(1n),
      positionIds: new BigInt64Array([0n, 1n, 2n]),
    });
    assert.deepEqual([...out.keys()], ["blocks.1.hook_mlp_out", "blocks.0.hook_resid_pre"]);
    for (const o of out.values()) assert.equal(o.data.length, 3 * 64);
    await s.close();
  });

  it("a GPU provider either runs or fails at start naming producer.executionProvider and what it needs", async () => {
    for (const provider of ["cuda", "webgpu"] as const) {
      try {
        const s = await openModelSession({ model, hookPoints: ["blocks.0.hook_resid_post"], provider, threads: 0 });
        assert.equal(s.dModel, 64, `${provider} runs here`);
        await s.close();
      } catch (err) {
        assert.ok(err instanceof ConfigError, String(err));
        assert.deepEqual(err.keys, ["producer.executionProvider"]);
        assert.match(
          err.message,
          new RegExp(
            `^producer\\.executionProvider: ${provider} (could not be loaded|cannot run the model|is not available).*producer\\.executionProvider=cpu`,
          ),
        );
      }
    }
  });

  /** b contexts of s tokens of one repeated id. */
  const inputs = (b: number, s: number): ForwardInputs => ({
    batch: b,
    length: s,
    inputIds: new BigInt64Array(b * s).fill(9906n),
    attentionMask: new BigInt64Array(b * s).fill(1n),
    positionIds: BigInt64Array.from({ length: b * s }, (_, i) => BigInt(i % s)),
  });

  it("on a GPU provider runs each pass on the model's thread: the producer's timers keep firing meanwhile", async () => {
    const s = await openModelSession({ model, hookPoints: ["blocks.1.hook_resid_post"], provider: "webgpu", threads: 0 });
    try {
      assert.equal(s.ownThread, true);
      const cpu = await openModelSession({ model, hookPoints: ["blocks.1.hook_resid_post"], provider: "cpu", threads: 1 });
      const want = (await cpu.run(inputs(2, 64))).get("blocks.1.hook_resid_post")!.data as Float32Array;
      assert.equal(cpu.ownThread, false);
      await cpu.close();
      let last = performance.now();
      let longestGap = 0;
      const tick = setInterval(() => {
        const now = performance.now();
        longestGap = Math.max(longestGap, now - last);
        last = now;
      }, 2);
      const t0 = performance.now();
      const out = await s.run(inputs(2, 64));
      const passMs = performance.now() - t0;
      clearInterval(tick);
      longestGap = Math.max(longestGap, performance.now() - last);
      const got = out.get("blocks.1.hook_resid_post")!.data as Float32Array;
      assert.equal(got.length, want.length);
      let worst = 0;
      for (let i = 0; i < got.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
      assert.ok(worst < 1e-3, `WebGPU and CPU hook tensors differ by ${worst}`);
      assert.ok(
        longestGap < passMs / 2,
        `the event loop went ${longestGap.toFixed(0)} ms without a timer during a ${passMs.toFixed(0)} ms pass`,
      );
    } finally {
      await s.close();
    }
  });

  it("warns when a pass on the producer's thread outlasts the keepalive timeout, naming what to change", () => {
    const config = loadConfig({ base: { transport: { keepaliveMs: 30_000 } } });
    assert.equal(longPassWarning(14_000, config), undefined);
    assert.match(
      longPassWarning(16_000, config)!,
      /16\.0 s, longer than the gRPC keepalive timeout \(15\.0 s.*producer\.batchContexts.*transport\.keepaliveMs/,
    );
  });

  it("on the model's thread, a pass that fails rejects with onnxruntime's error, the next runs, and a closed model refuses runs", async () => {
    const s = await openModelSession({ model, hookPoints: ["blocks.0.hook_resid_post"], provider: "webgpu", threads: 0 });
    const bad = { ...inputs(2, 4), inputIds: new BigInt64Array(3) }; // 3 ids for a [2, 4] batch
    await assert.rejects(s.run(bad), (err: Error) => !(err instanceof ConfigError) && /input_ids|size|shape|dimension/i.test(err.message));
    const out = await s.run(inputs(2, 4));
    assert.equal(out.get("blocks.0.hook_resid_post")!.data.length, 2 * 4 * 64);
    await s.close();
    await assert.rejects(s.run(inputs(1, 2)), /the model is closed/);
  });

  it("a model that cannot be opened on the model's thread fails at start naming producer.model", async () => {
    await assert.rejects(
      openModelSession({ model: "/nonexistent/model.onnx", hookPoints: ["blocks.0.hook_resid_post"], provider: "webgpu", threads: 0 }),
      (err: unknown) => err instanceof ConfigError && err.keys.includes("producer.model"),
    );
  });
});
