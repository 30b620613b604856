import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { stringify } from "yaml";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { layoutOf } from "../../tools/plan/layout.js";
import { planCommand } from "../../tools/plan/main.js";
import { plan, type Rates } from "../../tools/plan/model.js";
import { DEFAULT_RATES, ratesFromBench, ratesFromFile } from "../../tools/plan/rates.js";

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const A = "blocks.0.hook_resid_post";
const B = "blocks.3.hook_resid_post";

/**
 * Two pools, a (1000 wide) on shard 0 and b (500) on shards 0 and 1, fp32; two producers, two
 * trainers (a and b), one SAE of 1000 latents, 10,000 steps of 100 rows = 1e6 tokens per SAE.
 */
const CONFIG = {
  buffer: {
    dtype: "fp32",
    capacityRows: 1000,
    hookPoints: [
      { name: A, dModel: 1000 },
      { name: B, dModel: 500 },
    ],
    shards: [
      { address: "s0:1", hookPoints: [A, B] },
      { address: "s1:1", hookPoints: [B] },
    ],
  },
  producer: { hookPoints: [A, B], dtype: "fp32", shardCount: 2 },
  trainer: { hookPoints: [A, B], shardCount: 2, batchSize: 100, steps: 10_000, saes: [{ name: "s", recipe: "topk", width: 1000, k: 10 }] },
};
/** The whole 8-layer model at 1000 tok/s (the producer runs 4 layers: 2000), 500 tok/s per SAE, 1 GB/s shards and links. */
const RATES = {
  producerTokensPerSecond: 1000,
  modelLayers: 8,
  trainerTokensPerSecond: { 1000: 500 },
  bufferBytesPerSecond: 1e9,
  linkBytesPerSecond: 1e9,
  producersPerNode: 1,
  trainersPerNode: 2,
  buffersPerNode: 1,
};

let dir: string;
before(() => {
  dir = mkdtempSync(join(tmpdir(), "saeflow-plan-"));
  writeFileSync(join(dir, "run.yaml"), stringify(CONFIG));
  writeFileSync(join(dir, "rates.yaml"), stringify(RATES));
});
after(() => rmSync(dir, { recursive: true, force: true }));

const planOf = (sets: string[] = []) => {
  const out: string[] = [];
  const code = planCommand([join(dir, "run.yaml"), "--rates", join(dir, "rates.yaml"), ...sets], (t) => out.push(t));
  return { code, text: out.join("") };
};

describe("the plan of a small config, checked by hand", () => {
  test("every stage's time, each shard's bytes and memory, each node's link", () => {
    const rates: Rates = ratesFromFile(join(dir, "rates.yaml"));
    const layout = layoutOf(loadConfig({ base: CONFIG }));
    assert.deepEqual(
      layout.trainers.map((t) => t.hookPoints),
      [[A], [B]],
    );
    const p = plan(layout, rates);
    // Producers: 1e6 tokens at 1000 x 8 / 4 = 2000 tok/s = 500 GPU-s, over 2 producers.
    assert.equal(p.producerGpuSeconds, 500);
    // Trainers: one SAE each, 1e6 tokens at 500 tok/s.
    assert.deepEqual(p.trainerSeconds, [2000, 2000]);
    // Shard 0: a's 1e6 x 4000 B from both producers, b's 1e6 x 2000 B from producer 0 alone (half): 5e9 in,
    // 5e9 out to one reader each; (5e9 + 5e9) / (2 x 1e9) = 5 s. Shard 1: b from producer 1: 1e9 in and out, 1 s.
    assert.deepEqual(
      p.shardPlans.map((s) => [s.pools, s.poolBytes, s.inBytes, s.outBytes, s.seconds]),
      [
        [2, 1000 * 4000 + 1000 * 2000, 5e9, 5e9, 5],
        [1, 1000 * 2000, 1e9, 1e9, 1],
      ],
    );
    // Links: each producer alone on a node sends (4e9 + 2e9) / 2; both trainers on one node take 4e9 + 2e9.
    assert.deepEqual(
      p.links.map((l) => [l.kind, l.node, l.inBytes, l.outBytes, l.seconds]),
      [
        ["producer", 0, 0, 3e9, 3],
        ["producer", 1, 0, 3e9, 3],
        ["trainer", 0, 6e9, 0, 6],
        ["buffer", 0, 5e9, 5e9, 5],
        ["buffer", 1, 1e9, 1e9, 1],
      ],
    );
    assert.deepEqual(p.seconds, { producers: 250, trainers: 2000, buffers: 5, links: 6 });
    assert.deepEqual([p.runSeconds, p.bottleneck, p.saes, p.bytesIn, p.bytesOut], [2000, "trainers", 2, 6e9, 6e9]);
  });

  test("saeflow plan prints pods, GPUs, memory per shard, links, the time and what saturates first, each rate with its source", () => {
    const { code, text } = planOf();
    assert.equal(code, 0);
    for (const line of [
      "run: 2 SAE(s) (1 per hook point) on 2 of 2 pool(s), 1M tokens each, 4-byte activations",
      "  producers   2 pod(s), 1 GPU each   8.3 min GPU-time",
      "              4 of 8 layers: 2.0k tok/s per GPU",
      "  trainers    2 pod(s), 1 GPU each   1.1 h GPU-time, 1-1 hook point(s) each",
      "  GPUs        4",
      "  shard 0: 2 pool(s), 5.7 MiB, in 2.5 MB/s, out 2.5 MB/s, busy 0%",
      "  trainer node (1)      in 3.0 MB/s, out 0.0 MB/s, busy 0%",
      "  trainers    33.3 min   the busiest trainer process's GPU",
      "  links          6.0 s   the busiest node's network link",
      "time to train every SAE: 33.3 min, bounded by the busiest trainer process's GPU",
      `  bufferBytesPerSecond: given in ${join(dir, "rates.yaml")}`,
      "  bufferNodeBytes: given: 1.5 TiB of memory on a buffer node",
    ]) {
      assert.ok(text.includes(line), `no line "${line}" in:\n${text}`);
    }
  });

  test("a slower buffer becomes what saturates first, and fewer producers than shards leave a shard unfed", () => {
    const slow = planOf(["--set", "producer.shardCount=1"]).text;
    assert.match(
      slow,
      /shard 1: 1 pool\(s\), 1\.9 MiB, in 0\.0 MB\/s, out 0\.0 MB\/s, busy 0%; no producer pushes blocks\.3\.hook_resid_post here/,
    );
    const rates = { ...ratesFromFile(join(dir, "rates.yaml")), bufferBytesPerSecond: 1e6 };
    const p = plan(layoutOf(loadConfig({ base: CONFIG })), rates);
    // Shard 0 moves 1e10 bytes at 2 x 1e6 B/s.
    assert.deepEqual([p.bottleneck, p.runSeconds], ["buffers", 5000]);
  });
});

describe("rates name their source", () => {
  test("the defaults name a bench key or say they are given", () => {
    for (const [key, source] of Object.entries(DEFAULT_RATES.sources)) assert.match(source, /^(bench key |given)/, key);
    assert.deepEqual(
      Object.keys(DEFAULT_RATES.sources).sort(),
      Object.keys(DEFAULT_RATES)
        .filter((k) => k !== "sources")
        .sort(),
    );
  });

  test("a bench output's last line replaces the buffer's rate, naming its key", () => {
    const file = join(dir, "bench.txt");
    writeFileSync(file, `== buffer (2 cores)\n${JSON.stringify({ cores: 2, "buffer.e2e_8192b_rows_per_s": 20000 })}\n`);
    const rates = ratesFromBench(file);
    assert.equal(rates.bufferBytesPerSecond, 20000 * 8192);
    assert.equal(rates.sources.bufferBytesPerSecond, `bench key buffer.e2e_8192b_rows_per_s in ${file}: 20000 rows/s x 8192 B on 2 cores`);
  });
});

describe("bad input is refused naming the flag or key", () => {
  test("an unknown flag, a flag without its value, an unreadable or wrong rates file", () => {
    const refused = (args: string[], key: string, message: RegExp) => {
      assert.throws(
        () => planCommand(args, () => undefined),
        (err: unknown) => err instanceof ConfigError && err.keys[0] === key && message.test(err.message),
        args.join(" "),
      );
    };
    refused([join(dir, "run.yaml"), "--gpus", "8"], "--gpus", /^--gpus: unknown option; plan takes --set, --rates, --bench, --values$/);
    refused([join(dir, "run.yaml"), "--rates"], "--rates", /^--rates: needs a value$/);
    refused([join(dir, "run.yaml"), "--rates", join(dir, "none.yaml")], "--rates", /cannot read .*none\.yaml: ENOENT/);
    writeFileSync(join(dir, "bad-rates.yaml"), "linkBytesPerSecond: -1\nnodes: 3\n");
    refused(
      [join(dir, "run.yaml"), "--rates", join(dir, "bad-rates.yaml")],
      "--rates",
      /linkBytesPerSecond: .*; \(root\): Unrecognized key: "nodes"/,
    );
    refused([], "CONFIG", /plan takes one config file or --values, got 0/);
  });

  test("saeflow plan with a bad flag exits 2 with a message naming the flag", () => {
    const r = spawnSync(process.execPath, ["--import", "tsx", "tools/cli/main.ts", "plan", "deploy/configs/local.yaml", "--shards", "2"], {
      cwd: ROOT,
      encoding: "utf8",
    });
    assert.equal(r.status, 2, r.stderr);
    assert.equal(r.stderr, "saeflow: --shards: unknown option; plan takes --set, --rates, --bench, --values\n");
  });
});

test("the Llama Scope preset's plan is what its comments say: 3.7 h, bounded by the trainers with three hook points", () => {
  const out: string[] = [];
  planCommand(
    [
      "--values",
      join(ROOT, "deploy/helm/saeflow/values-llama-scope-8x-full.yaml"),
      "--rates",
      join(ROOT, "deploy/configs/llama-scope-rates.yaml"),
    ],
    (t) => out.push(t),
  );
  const text = out.join("");
  for (const line of [
    "run: 128 SAE(s) (1 per hook point) on 128 of 128 pool(s), 800M tokens each, 2-byte activations",
    "  trainers    56 pod(s), 1 GPU each   156.3 h GPU-time, 2-3 hook point(s) each",
    "  shards 0-255: 1 pool(s), 3.8 GiB, in 248.5 MB/s, out 248.5 MB/s, busy 76%",
    "  trainer node (8)      in 10.44 GB/s, out 0.0 MB/s, busy 83%",
    "  activations 838.9 TB into the buffers, 838.9 TB out",
    "  links          3.1 h   the busiest node's network link",
    "  buffers        2.8 h   the busiest buffer shard's bandwidth",
    "  producers   42.7 min   the producers' GPUs (forward passes)",
    "time to train every SAE: 3.7 h, bounded by the busiest trainer process's GPU",
  ]) {
    assert.ok(text.includes(line), `no line "${line}" in:\n${text}`);
  }
});
