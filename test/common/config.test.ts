import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it } from "node:test";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { ownShard, poolWidth, shardFor, shardsOf, trainerHookPoints } from "../../services/common/shards.js";

const refusedKeys = (fn: () => unknown): string[] => {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof ConfigError, `expected ConfigError, got ${String(err)}`);
    return err.keys;
  }
  assert.fail("config was accepted");
};

describe("config loader", () => {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-config-"));

  it("fills every section with documented defaults", () => {
    const c = loadConfig();
    assert.equal(c.run.id, "local");
    assert.equal(c.buffer.lowWatermark, 0.5);
    assert.ok(c.transport.maxMessageBytes > 4 << 20);
  });

  it("layers file < environment < --set flags", () => {
    const file = join(dir, "run.yaml");
    writeFileSync(file, "run:\n  id: from-file\nbuffer:\n  capacityRows: 100\n  lowWatermark: 0.4\n");
    const c = loadConfig({
      file,
      env: {
        SAEFLOW_BUFFER__CAPACITY_ROWS: "200",
        SAEFLOW_RUN__ID: "from-env",
        NATS_URL: "nats://10.0.0.1:4222",
        OTEL_EXPORTER_OTLP_ENDPOINT: "http://j:4318",
      },
      sets: ["run.id=from-flag"],
    });
    assert.equal(c.run.id, "from-flag");
    assert.equal(c.buffer.capacityRows, 200);
    assert.equal(c.buffer.lowWatermark, 0.4);
    assert.equal(c.nats.url, "nats://10.0.0.1:4222");
    assert.equal(c.telemetry.otlpEndpoint, "http://j:4318");
  });

  it("names each bad key and where its value came from", () => {
    try {
      loadConfig({ env: { SAEFLOW_BUFFER__LOW_WATERMARK: "2" }, sets: ["transport.maxMessageBytes=12"] });
      assert.fail("accepted");
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.keys.sort(), ["buffer.lowWatermark", "transport.maxMessageBytes"]);
      assert.match(err.message, /buffer\.lowWatermark: .*\(from env SAEFLOW_BUFFER__LOW_WATERMARK\)/);
      assert.match(err.message, /transport\.maxMessageBytes: .*\(from --set transport\.maxMessageBytes\)/);
    }
  });

  it("refuses unknown keys, wrong types, malformed files and malformed flags", () => {
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["buffer.capacityRowz=5"] })),
      ["buffer.capacityRowz"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["buffer.dtype=fp64"] })),
      ["buffer.dtype"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["nonsense"] })),
      ["--set"],
    );
    const bad = join(dir, "bad.yaml");
    writeFileSync(bad, "run: [unclosed\n");
    assert.deepEqual(
      refusedKeys(() => loadConfig({ file: bad })),
      ["(file)"],
    );
    writeFileSync(bad, "- a list\n");
    assert.deepEqual(
      refusedKeys(() => loadConfig({ file: bad })),
      ["(root)"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ file: join(dir, "missing.yaml") })),
      ["(file)"],
    );
  });
});

describe("list elements from flags and environment", () => {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-config-lists-"));
  const sweep = join(dir, "sweep.yaml");
  writeFileSync(
    sweep,
    "trainer:\n  saes:\n    - { name: a, recipe: topk, width: 64, k: 8 }\n    - { name: b, recipe: batchtopk, width: 64, k: 16 }\n",
  );

  it("--set trainer.saes.0.k=4 changes one SAE of the default sweep and keeps the list a list", () => {
    const c = loadConfig({ sets: ["trainer.saes.0.k=4"] });
    assert.equal(c.trainer.saes.length, 1);
    assert.equal(c.trainer.saes[0]!.k, 4);
    assert.equal(c.trainer.saes[0]!.name, loadConfig().trainer.saes[0]!.name, "the rest of the default SAE is kept");
  });

  it("flags and environment address one SAE of a file's sweep, and can add a field to it", () => {
    const c = loadConfig({
      file: sweep,
      env: { SAEFLOW_TRAINER__SAES__1__K: "12" },
      sets: ["trainer.saes.0.kStart=32", "trainer.saes.1.lr=0.001"],
    });
    assert.deepEqual(
      c.trainer.saes.map((s) => [s.name, s.recipe, s.k, s.kStart, s.lr]),
      [
        ["a", "topk", 8, 32, 2e-4],
        ["b", "batchtopk", 12, 0, 0.001],
      ],
    );
  });

  it("a bad value in one element is refused naming that element and its source; an index past the end is refused", () => {
    try {
      loadConfig({ file: sweep, sets: ["trainer.saes.1.k=65"] });
      assert.fail("accepted");
    } catch (err) {
      assert.ok(err instanceof ConfigError);
      assert.deepEqual(err.keys, ["trainer.saes.1.k"]);
      assert.equal(err.message, "trainer.saes.1.k: k (65) exceeds width (64) (from --set trainer.saes.1.k)");
    }
    assert.deepEqual(
      refusedKeys(() => loadConfig({ file: sweep, sets: ["trainer.saes.5.k=4"] })),
      ["trainer.saes.5"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ file: sweep, env: { SAEFLOW_TRAINER__SAES__X__K: "4" } })),
      ["trainer.saes.x"],
    );
  });

  it("a whole list still replaces the list", () => {
    const c = loadConfig({ file: sweep, sets: ["trainer.saes=[{name: only, width: 32, k: 4}]"] });
    assert.deepEqual(
      c.trainer.saes.map((s) => s.name),
      ["only"],
    );
  });
});

describe("text values from flags and environment", () => {
  it("keeps a string key's text as written (no YAML number or boolean), and still reads numbers and lists where the schema wants them", () => {
    const c = loadConfig({
      env: { SAEFLOW_RUN__ID: "0123", SAEFLOW_PRODUCER__ID: "true", SAEFLOW_BUFFER__CAPACITY_ROWS: "2048" },
      sets: ["trainer.saes.0.name=007", "producer.hookPoints=[blocks.1.hook_resid_post]", `nats.subjectPrefix="quoted"`],
    });
    assert.equal(c.run.id, "0123");
    assert.equal(c.producer.id, "true");
    assert.equal(c.buffer.capacityRows, 2048);
    assert.equal(c.trainer.saes[0]!.name, "007");
    assert.deepEqual(c.producer.hookPoints, ["blocks.1.hook_resid_post"]);
    assert.equal(c.nats.subjectPrefix, "quoted", "YAML quotes come off");
  });
});

describe("config consistency across roles", () => {
  it("refuses a trainer or producer that does not match the buffer's pools, naming the key", () => {
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["trainer.hookPoints=[blocks.1.hook_resid_post, blocks.0.hook_resid_post]"] })),
      ["trainer.hookPoints.1"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["trainer.shardIndex=2", "trainer.shardCount=2"] })),
      ["trainer.shardIndex"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["producer.hookPoints=[blocks.1.hook_resid_post, blocks.0.hook_mlp_out]"] })),
      ["producer.hookPoints.1"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["producer.dtype=bf16"] })),
      ["producer.dtype"],
    );
  });
});

describe("buffer shards", () => {
  const pools = "buffer.hookPoints=[{name: a, dModel: 8}, {name: b, dModel: 16}, {name: c, dModel: 8}]";
  const roles = ["producer.hookPoints=[a, b, c]", "trainer.hookPoints=[a, b, c]"];
  const sharded = [pools, ...roles, "buffer.shards=[{address: 'h0:1', hookPoints: [a, b]}, {address: 'h1:1', hookPoints: [b, c]}]"];

  it("places each pool, spreads a pool held by several shards over the producers, and splits hook points over trainers", () => {
    const c = loadConfig({ sets: sharded });
    assert.deepEqual(
      shardsOf(c.buffer).map((s) => [s.index, s.address, s.hookPoints]),
      [
        [0, "h0:1", ["a", "b"]],
        [1, "h1:1", ["b", "c"]],
      ],
    );
    assert.deepEqual(
      [0, 1, 2, 3].map((p) => shardFor(c.buffer, "b", p).index),
      [0, 1, 0, 1],
    );
    assert.deepEqual(
      [0, 1].map((p) => shardFor(c.buffer, "a", p).index),
      [0, 0],
    );
    assert.equal(poolWidth(c.buffer, "b"), 16);
    assert.deepEqual(
      [0, 1].map((i) => trainerHookPoints(c.trainer, i, 2)),
      [["a", "c"], ["b"]],
    );
    assert.deepEqual(
      [0, 1, 2, 3, 4].map((i) => trainerHookPoints(c.trainer, i, 5)),
      [["a"], ["b"], ["c"], ["a"], ["b"]],
    );
    const one = loadConfig({ sets: [pools, ...roles] });
    assert.deepEqual(shardsOf(one.buffer), [{ index: 0, address: one.buffer.address, hookPoints: ["a", "b", "c"] }]);
    assert.deepEqual(ownShard(loadConfig({ sets: [...sharded, "buffer.shard=1"] }).buffer).hookPoints, ["b", "c"]);
  });

  it("refuses a shard table that misses a pool, names an unknown one, repeats an address, or a shard index past it", () => {
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: [pools, ...roles, "buffer.shards=[{address: 'h0:1', hookPoints: [a, b]}]"] })),
      ["buffer.shards"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: [pools, ...roles, "buffer.shards=[{address: 'h0:1', hookPoints: [a, b, c, d]}]"] })),
      ["buffer.shards.0.hookPoints.3"],
    );
    assert.deepEqual(
      refusedKeys(() =>
        loadConfig({
          sets: [pools, ...roles, "buffer.shards=[{address: 'h0:1', hookPoints: [a, b]}, {address: 'h0:1', hookPoints: [c]}]"],
        }),
      ),
      ["buffer.shards.1.address"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: [...sharded, "buffer.shard=2"] })),
      ["buffer.shard"],
    );
    assert.deepEqual(
      refusedKeys(() => loadConfig({ sets: ["buffer.shard=1"] })),
      ["buffer.shard"],
    );
  });
});
