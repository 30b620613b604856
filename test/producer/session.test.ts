import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { ConfigError } from "../../services/common/config/index.js";
import { openModelSession } from "../../services/producer/session.js";
import { tinyModel } from "./harness.js";

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
});
