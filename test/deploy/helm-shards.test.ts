import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { IConfigMap, IService } from "kubernetes-models/v1";
import { stringify } from "yaml";
import { loadConfig } from "../../services/common/config/index.js";
import { ownShard, shardFor, shardsHolding, shardsOf, trainerHookPoints } from "../../services/common/shards.js";
import { helm, offlineChart, validateObject } from "./chart.js";
import { podEnv, render } from "./helm-render.js";

/**
 * A run of two buffer shards: shard 0 holds a (1024 wide) and b (2048), shard 1 holds c (512) and
 * b again, so b is spread over both; three producers, two trainers over the three hook points.
 */
const SHARDED = {
  config: {
    buffer: {
      dtype: "bf16",
      capacityRows: 1_000_000,
      hookPoints: [
        { name: "blocks.0.hook_resid_post", dModel: 1024 },
        { name: "blocks.1.hook_resid_post", dModel: 2048 },
        { name: "blocks.2.hook_resid_post", dModel: 512 },
      ],
      shards: [
        { hookPoints: ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] },
        { hookPoints: ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"] },
      ],
    },
    producer: { dtype: "bf16", hookPoints: ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"] },
    trainer: { hookPoints: ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"] },
  },
  buffer: { memoryOverheadMiB: 100 },
  producer: { replicas: 3 },
  trainer: { replicas: 2 },
};

let chart: ReturnType<typeof offlineChart>;
before(() => {
  chart = offlineChart();
  writeFileSync(join(chart.dir, "values-sharded-under-test.yaml"), stringify(SHARDED));
});
after(() => chart.close());

const sharded = () => render(chart.dir, "rel", ["values-sharded-under-test.yaml"]);

describe("buffer shards", () => {
  test("two shards render a Service each and one Indexed Job of two completions, all valid Kubernetes objects", () => {
    const r = sharded();
    for (const o of r.objects) validateObject(o);
    const job = r.job("buffer").spec!;
    assert.deepEqual([job.completionMode, job.completions, job.parallelism], ["Indexed", 2, 2]);
    // Each shard counts its own failures: one shard failing does not end the other.
    assert.deepEqual([job.backoffLimitPerIndex, job.backoffLimit], [3, undefined]);
    const services = r.objects.filter((o) => o.kind === "Service" && o.metadata.labels?.["app.kubernetes.io/component"] === "buffer");
    assert.deepEqual(
      services.map((s) => s.metadata.name),
      ["rel-saeflow-buffer-0", "rel-saeflow-buffer-1"],
    );
    services.forEach((o, i) => {
      const svc = o as unknown as IService;
      assert.deepEqual(svc.spec!.selector, {
        "app.kubernetes.io/name": "saeflow",
        "app.kubernetes.io/instance": "rel",
        "app.kubernetes.io/component": "buffer",
        "batch.kubernetes.io/job-completion-index": String(i),
      });
      assert.deepEqual([svc.spec!.ports![0]!.port, svc.spec!.ports![0]!.targetPort], [50051, "grpc"]);
    });
    const notes = r.get<IConfigMap>("ConfigMap", "notes-under-test").data!.notes!;
    for (const line of [
      "3 producer(s) -> 2 buffer shard(s) (5960Mi each) -> 2 trainer(s)",
      "Shard i of the buffer is svc/rel-saeflow-buffer-i (i = 0..1), holding:\n  0: blocks.0.hook_resid_post, blocks.1.hook_resid_post\n  1: blocks.2.hook_resid_post, blocks.1.hook_resid_post",
    ]) {
      assert.ok(notes.includes(line), `NOTES lack: ${line}\n${notes}`);
    }
  });

  test("a buffer pod's memory is its shard's pools, the largest shard's when they differ", () => {
    const r = sharded();
    // Shard 0: 1e6 rows x (1024 + 2048) x 2 bytes = 5859.375 MiB -> 5860; shard 1: 1e6 x 2560 x 2 = 4883 MiB.
    // One pod template serves both, so both get shard 0's 5860 MiB + 100 MiB overhead (not all three pools' 6836).
    assert.deepEqual(r.container("buffer").resources, { requests: { cpu: "2", memory: "5960Mi" }, limits: { memory: "5960Mi" } });
    const even = render(chart.dir, "rel", ["values-sharded-under-test.yaml"], ["config.buffer.hookPoints[2].dModel=1024"]);
    assert.equal(even.container("buffer").resources?.requests?.memory, "5960Mi");
    const one = render(
      chart.dir,
      "rel",
      ["values-sharded-under-test.yaml"],
      ["config.buffer.shards[0].hookPoints={blocks.0.hook_resid_post}"],
    );
    // Shard 0 now holds a alone (1953.125 -> 1954 MiB), shard 1 c and b (4883 MiB): the largest is shard 1's.
    assert.equal(one.container("buffer").resources?.requests?.memory, "4983Mi");
  });

  test("every pod reads the shard table with the Services' addresses and finds its own part in it", () => {
    const r = sharded();
    const table = [
      { index: 0, address: "rel-saeflow-buffer-0:50051", hookPoints: ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"] },
      { index: 1, address: "rel-saeflow-buffer-1:50051", hookPoints: ["blocks.2.hook_resid_post", "blocks.1.hook_resid_post"] },
    ];
    const services = new Set(r.objects.filter((o) => o.kind === "Service").map((o) => `${o.metadata.name}:50051`));
    for (const role of ["buffer", "producer", "trainer"] as const) {
      const { completions } = r.job(role).spec!;
      for (let i = 0; i < completions!; i++) {
        const cfg = loadConfig({ base: r.values.config, env: podEnv(r.container(role), i) });
        assert.deepEqual(shardsOf(cfg.buffer), table, `${role} ${i}`);
        for (const s of shardsOf(cfg.buffer)) assert.ok(services.has(s.address), `${s.address} is a rendered Service`);
        if (role === "buffer") {
          assert.equal(ownShard(cfg.buffer).index, i);
          assert.equal(cfg.buffer.trainers, 2, "the buffer ends the run once both trainers are done");
        }
        if (role === "producer") {
          assert.deepEqual([cfg.producer.shardIndex, cfg.producer.shardCount], [i, 3]);
          // b is spread: producers 0 and 2 push it to shard 0, producer 1 to shard 1.
          assert.equal(shardFor(cfg.buffer, "blocks.1.hook_resid_post", i).index, i % 2);
        }
        if (role === "trainer") {
          assert.deepEqual([cfg.trainer.id, cfg.trainer.shardIndex, cfg.trainer.shardCount], [`trainer-${i}`, i, 2]);
          const mine = trainerHookPoints(cfg.trainer, i, 2);
          assert.deepEqual(mine, i === 0 ? ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"] : ["blocks.1.hook_resid_post"]);
          if (i === 1)
            assert.deepEqual(
              shardsHolding(cfg.buffer, mine[0]!).map((s) => s.index),
              [0, 1],
            );
        }
      }
    }
  });

  test("a pool no shard holds is refused, naming it", () => {
    const r = helm([
      "template",
      "rel",
      chart.dir,
      "-f",
      join(chart.dir, "values-sharded-under-test.yaml"),
      "--set",
      "config.buffer.shards[1].hookPoints={blocks.1.hook_resid_post}",
    ]);
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /config\.buffer\.shards: no shard holds the pool blocks\.2\.hook_resid_post/);
  });
});
