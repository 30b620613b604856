import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { loadConfig } from "../../services/common/config/index.js";
import { ownShard, shardFor, shardsHolding, shardsOf, trainerHookPoints } from "../../services/common/shards.js";
import { CHART, helm, offlineChart, validateObject } from "./chart.js";
import { podEnv, type Rendered, render } from "./helm-render.js";

const PRESET = "values-llama-scope-8x-full.yaml";
const KINDS = ["hook_resid_mid", "hook_attn_out", "hook_mlp_out", "hook_resid_post"];

let chart: ReturnType<typeof offlineChart>;
let r: Rendered;
before(() => {
  chart = offlineChart();
  r = render(chart.dir, "ls8x", [PRESET]);
});
after(() => chart.close());

test("the Llama Scope 8x preset lints, and every object it renders validates against the Kubernetes schemas", () => {
  const lint = helm(["lint", CHART, "-f", join(CHART, PRESET)]);
  assert.equal(lint.code, 0, `${lint.stdout}${lint.stderr}`);
  for (const o of r.objects) validateObject(o);
  const count = (kind: string) => r.objects.filter((o) => o.kind === kind).length;
  assert.deepEqual([count("Job"), count("Service"), count("PersistentVolumeClaim")], [3, 256 + 2, 1]);
  assert.deepEqual(
    (["buffer", "producer", "trainer"] as const).map((role) => r.job(role).spec!.completions),
    [256, 8, 56],
  );
  // 500,000 rows x 4096 x 2 bytes = 3906.25 MiB, rounded up, + 2048 MiB: one pool per shard.
  assert.deepEqual(r.container("buffer").resources?.limits, { memory: "5955Mi" });
});

test("the preset's pods read 128 pools, four per layer, each spread over two shards at their Services", () => {
  const base = r.values.config;
  const services = new Set(r.objects.filter((o) => o.kind === "Service").map((o) => `${o.metadata.name}:50051`));
  const buffer = loadConfig({ base, env: podEnv(r.container("buffer"), 255) });
  assert.equal(ownShard(buffer.buffer).index, 255);
  const pools = buffer.buffer.hookPoints.map((h) => h.name);
  assert.deepEqual(pools, Array.from({ length: 32 }, (_, l) => KINDS.map((k) => `blocks.${l}.${k}`)).flat());
  assert.ok(buffer.buffer.hookPoints.every((h) => h.dModel === 4096));
  for (const s of shardsOf(buffer.buffer)) assert.ok(services.has(s.address), s.address);
  pools.forEach((pool, p) =>
    assert.deepEqual(
      shardsHolding(buffer.buffer, pool).map((s) => s.index),
      [2 * p, 2 * p + 1],
      pool,
    ),
  );

  const producer = loadConfig({ base, env: podEnv(r.container("producer"), 5) });
  assert.deepEqual([producer.producer.shardIndex, producer.producer.shardCount, producer.producer.hookPoints], [5, 8, pools]);
  assert.equal(shardFor(producer.buffer, "blocks.31.hook_resid_post", 5).index, 255);

  const trainer = loadConfig({ base, env: podEnv(r.container("trainer"), 15) });
  assert.deepEqual([trainer.trainer.shardIndex, trainer.trainer.shardCount, buffer.buffer.trainers], [15, 56, 56]);
  assert.deepEqual(trainerHookPoints(trainer.trainer, 15, 56), [pools[15], pools[71], pools[127]]);
  assert.deepEqual(trainerHookPoints(trainer.trainer, 16, 56), [pools[16], pools[72]]);
});
