import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import ort from "onnxruntime-node";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { corpusContexts, type EvalContexts } from "../../tools/eval/contexts.js";
import { SaeFolderError } from "../../tools/eval/sae.js";
import { evaluateSplice, type SpliceResult } from "../../tools/eval/splice.js";
import { feedsFor } from "../model/tiny.js";
import { identitySae, tinyLlama, writeSae, zeroSae } from "./fixtures.js";

const RESID = "blocks.0.hook_resid_post";
const ATTN = "blocks.1.hook_attn_out";

/** Next-token loss of the uncut model over the positions whose token is not BOS, in float64. */
async function uncutLoss(modelPath: string, contexts: number[][], bos: number): Promise<number> {
  const session = await ort.InferenceSession.create(modelPath);
  let sum = 0;
  let count = 0;
  try {
    for (const ids of contexts) {
      const logits = (await session.run(feedsFor([ids]))).logits!.data as Float32Array;
      const V = logits.length / ids.length;
      for (let p = 0; p < ids.length - 1; p++) {
        if (ids[p] === bos) continue;
        const row = logits.subarray(p * V, (p + 1) * V);
        const max = row.reduce((m, v) => Math.max(m, v), -Infinity);
        const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
        sum += lse - row[ids[p + 1]!]!;
        count++;
      }
    }
  } finally {
    await session.release();
  }
  return sum / count;
}

describe("splice evaluation on the tiny model", () => {
  const root = mkdtempSync(join(tmpdir(), "saeflow-eval-splice-"));
  after(() => rmSync(root, { recursive: true, force: true }));
  const tiny = tinyLlama();
  const d = tiny.params.dModel;
  let corpus: EvalContexts;
  let rows: SpliceResult[];

  before(async () => {
    // Short contexts of the built-in corpus, packed as the producer packs them: BOS first and
    // between documents, so some BOS positions fall mid-context.
    corpus = await corpusContexts({ ...RunConfigSchema.parse({}).producer, contextLength: 24 }, 3);
    rows = await evaluateSplice({
      modelPath: tiny.modelPath,
      saeDirs: [
        identitySae(join(root, "identity"), RESID, d),
        zeroSae(join(root, "zero"), RESID, d),
        identitySae(join(root, "identity-attn"), ATTN, d),
        zeroSae(join(root, "zero-attn"), ATTN, d),
      ],
      contexts: corpus.contexts,
      bosId: corpus.bosId ?? null,
    });
  });

  test("the contexts are the producer's packing: full length, BOS first and between documents", () => {
    assert.equal(corpus.contexts.length, 3);
    assert.equal(corpus.bosId, 128000);
    for (const c of corpus.contexts) {
      assert.equal(c.length, 24);
      assert.equal(c[0], corpus.bosId);
    }
    const bosCount = corpus.contexts.flat().filter((t) => t === corpus.bosId).length;
    assert.ok(bosCount > 3, "some context holds a document boundary");
    // Every non-BOS position is reconstructed; the loss counts those that have a next token.
    assert.equal(rows[0]!.tokens, 3 * 24 - bosCount);
    const predicted = corpus.contexts.flatMap((c) => c.slice(0, -1)).filter((t) => t !== corpus.bosId).length;
    assert.equal(rows[0]!.predictions, predicted);
  });

  test("the unchanged loss is the uncut model's next-token loss over non-BOS positions", async () => {
    const expected = await uncutLoss(tiny.modelPath, corpus.contexts, corpus.bosId!);
    for (const row of rows)
      assert.ok(Math.abs(row.lm_loss_original - expected) < 1e-4, `${row.hook}: ${row.lm_loss_original} vs ${expected}`);
  });

  test("the identity SAE recovers the whole loss: fraction 1, no loss increase, no KL, cosine 1", () => {
    for (const row of [rows[0]!, rows[2]!]) {
      assert.ok(Math.abs(row.fraction_loss_recovered - 1) < 1e-4, `${row.hook}: ${row.fraction_loss_recovered}`);
      assert.ok(Math.abs(row.delta_lm_loss) < 1e-6);
      assert.ok(Math.abs(row.kl_divergence) < 1e-6);
      assert.ok(Math.abs(row.cosine_similarity - 1) < 1e-6);
      assert.ok(Math.abs(row.relative_reconstruction_bias - 1) < 1e-6);
      assert.ok(Math.abs(row.explained_variance - 1) < 1e-6);
      assert.equal(row.mse, 0);
      assert.ok(row.l0 > d - 1 && row.l0 <= d, "one of each +/- pair fires per dimension");
    }
  });

  test("the zero SAE is zero ablation: fraction 0, its loss is the zero-ablation loss, KL > 0", () => {
    for (const row of [rows[1]!, rows[3]!]) {
      assert.equal(row.lm_loss_sae, row.lm_loss_zero);
      assert.equal(Math.abs(row.fraction_loss_recovered), 0); // -0 when the zero-ablation loss is the lower one
      assert.notEqual(row.lm_loss_zero, row.lm_loss_original);
      assert.ok(row.kl_divergence > 1e-4, `${row.hook}: KL ${row.kl_divergence}`);
      assert.equal(row.cosine_similarity, 0);
      assert.equal(row.l0, 0);
      assert.ok(Number.isNaN(row.relative_reconstruction_bias), "x . x_hat is 0: the bias is undefined (null in JSON)");
    }
  });

  test("rows come back in the order the SAEs were given, each with its hook", () => {
    assert.deepEqual(
      rows.map((r) => [r.sae.slice(root.length + 1), r.hook]),
      [
        ["identity", RESID],
        ["zero", RESID],
        ["identity-attn", ATTN],
        ["zero-attn", ATTN],
      ],
    );
  });

  test("an SAE whose hook is not in the model, or of another width, is refused naming the folder and hook", async () => {
    const contexts = corpus.contexts.slice(0, 1);
    const beyond = identitySae(join(root, "beyond"), "blocks.7.hook_resid_post", d);
    await assert.rejects(
      evaluateSplice({ modelPath: tiny.modelPath, saeDirs: [beyond], contexts }),
      (err: Error) =>
        err instanceof SaeFolderError && err.dir === beyond && /hook_name "blocks\.7\.hook_resid_post".*2 layers/.test(err.message),
    );
    const narrow = writeSae(join(root, "narrow"), { hook: RESID, n: 8, d: 4 });
    await assert.rejects(
      evaluateSplice({ modelPath: tiny.modelPath, saeDirs: [narrow], contexts }),
      (err: Error) => err instanceof SaeFolderError && /d_in is 4 but blocks\.0\.hook_resid_post is 64 wide/.test(err.message),
    );
  });
});
