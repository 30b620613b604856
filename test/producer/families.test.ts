import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import * as ort from "onnxruntime-node";
import { ConfigError } from "../../services/common/config/index.js";
import { fromTensor } from "../../services/common/tensor-codec.js";
import type { ActivationChunk } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { openHookSession } from "../../services/producer/model/session.js";
import { startProducer } from "../../services/producer/producer.js";
import { loadTokenizer } from "../../services/producer/tokenizer.js";
import { FAMILIES, FAMILY_NAMES, type FamilyName } from "../../tools/model/families.js";
import { makeTinyFamily, type TinyFamily } from "../../tools/model/tiny-family.js";
import { allHooks } from "../model/tiny.js";
import { paragraphs, startWorld, type World, writeDataset } from "./harness.js";

// The producer end to end on each supported family's tiny model: real nats-server, real gRPC to a
// recording buffer, the model folder's own tokenizer.json, every hook kind of the last layer.

const quiet = { address: "127.0.0.1:0", log: () => undefined };

/** Each context rebuilt from its rows (every real token is sent) and run alone through onnxruntime: same activations. */
async function checkAgainstDirectRun(tiny: TinyFamily, chunks: ActivationChunk[], hooks: string[]): Promise<number> {
  const d = tiny.params.dModel;
  const session = await openHookSession(tiny.modelPath, hooks);
  let contexts = 0;
  try {
    for (const hook of hooks) {
      const rows = chunks
        .filter((c) => c.hookPoint === hook)
        .flatMap((c) => {
          const values = fromTensor(c.activations!) as Float32Array;
          return c.tokenIds.map((t, r) => ({ t, ctx: c.contextIds[r]!, v: values.subarray(r * d, (r + 1) * d) }));
        });
      for (const id of new Set(rows.map((r) => r.ctx))) {
        contexts++;
        const mine = rows.filter((r) => r.ctx === id);
        const dims = [1, mine.length];
        const out = await session.run({
          input_ids: new ort.Tensor("int64", BigInt64Array.from(mine.map((r) => BigInt(r.t))), dims),
          attention_mask: new ort.Tensor("int64", new BigInt64Array(mine.length).fill(1n), dims),
          position_ids: new ort.Tensor("int64", BigInt64Array.from(mine.map((_, i) => BigInt(i))), dims),
        });
        const direct = out[hook]!.data as Float32Array;
        mine.forEach((r, p) => {
          for (let k = 0; k < d; k++) {
            const want = direct[p * d + k]!;
            assert.ok(
              Math.abs(r.v[k]! - want) <= 1e-5 * (1 + Math.abs(want)),
              `${hook} context ${id} position ${p}[${k}]: ${r.v[k]} vs ${want}`,
            );
          }
        });
      }
    }
  } finally {
    await session.release();
  }
  return contexts;
}

describe("producer on every supported family", () => {
  let world: World;
  let text: string;
  let data: string;
  const tiny = {} as Record<FamilyName, TinyFamily>;
  before(async () => {
    world = await startWorld();
    text = paragraphs(3, 7);
    data = writeDataset(world.dir, "families", { "doc.txt": text });
    for (const family of FAMILY_NAMES) tiny[family] = makeTinyFamily({ family, out: join(world.dir, `tiny-${family}`) });
  });
  after(() => world.close());

  /** A run config for `family`'s model and tokenizer, with a buffer pool per hook point. */
  const config = (family: FamilyName, hooks: string[], producer: Record<string, unknown> = {}) =>
    world.config(
      {
        id: family.replace("_", "-"),
        model: tiny[family].modelPath,
        tokenizer: tiny[family].dir,
        dataset: [data],
        hookPoints: hooks,
        contextLength: 16,
        batchContexts: 4,
        epochs: 1,
        // Qwen2's tokenizer has no BOS: its contexts start with text.
        prependBos: FAMILIES[family].tokenizer.bos !== undefined,
        excludeBos: false,
        ...producer,
      },
      // The trainer's default hook point needs a pool too, for the config to load.
      { hookPoints: [...new Set([...hooks, "blocks.1.hook_resid_post"])].map((name) => ({ name, dModel: tiny[family].params.dModel })) },
    );

  for (const family of FAMILY_NAMES) {
    it(`streams every hook kind of ${FAMILIES[family].title}, equal to a direct run of the same contexts`, async () => {
      await world.newBuffer();
      const hooks = allHooks(family, tiny[family].params.layers).filter((h) => h.startsWith("blocks.1."));
      const p = await startProducer(config(family, hooks), quiet);
      await world.demand.grant({ [p.id]: 1e12 });
      assert.equal(await p.finished, undefined);
      await p.stop();
      const chunks = world.buffer.chunks().filter((c) => c.producerId === p.id);
      for (const hook of hooks)
        assert.ok(
          chunks.some((c) => c.hookPoint === hook),
          `no chunk for ${hook}`,
        );

      // The token stream is the text's paragraphs as this family's tokenizer encodes them.
      const tokenizer = loadTokenizer(tiny[family].dir);
      const docs = text.split(/\n\s*\n/).filter((t) => t.trim());
      const expected = (await tokenizer.encode(docs.map((t) => t.trim()))).flat();
      const sent = chunks.filter((c) => c.hookPoint === hooks[0]).flatMap((c) => c.tokenIds);
      assert.deepEqual(
        sent.filter((t) => t !== tokenizer.bosId),
        expected,
      );
      const contexts = await checkAgainstDirectRun(tiny[family], chunks, hooks);
      assert.ok(contexts >= 10 * hooks.length, `only ${contexts} contexts checked`);
    });
  }

  it("refuses resid_mid on a parallel GPT-NeoX model at start, naming producer.hookPoints", async () => {
    await assert.rejects(startProducer(config("gpt_neox", ["blocks.1.hook_resid_mid"]), quiet), (err: unknown) => {
      assert.ok(err instanceof ConfigError, String(err));
      assert.deepEqual(err.keys, ["producer.hookPoints"]);
      assert.match(err.message, /blocks\.1\.hook_resid_mid.*in parallel/);
      return true;
    });
  });
});
