import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import type { IConfigMap, IService } from "kubernetes-models/v1";
import { parse as parseYaml } from "yaml";
import { loadConfig } from "../../services/common/config/index.js";
import { shardsOf } from "../../services/common/shards.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { CHART, helm, offlineChart, validateObject } from "./chart.js";
import { podEnv, ROLES, type Rendered, type Role, render as renderChart } from "./helm-render.js";

const GRPC_SERVICE: Record<Role, string> = {
  buffer: BufferService.typeName,
  producer: ProducerService.typeName,
  trainer: TrainerService.typeName,
};

let chart: ReturnType<typeof offlineChart>;
before(() => {
  chart = offlineChart();
});
after(() => chart.close());

const render = (release: string, valueFiles: string[], sets: string[] = []): Rendered => renderChart(chart.dir, release, valueFiles, sets);

const GPU_FILES = ["values-gpu.yaml"];

test("helm lint passes on the default values and on values-gpu.yaml", () => {
  for (const files of [[], GPU_FILES]) {
    // Linted in place: a NATS dependency not yet fetched is a warning there, not an error.
    const r = helm(["lint", CHART, ...files.flatMap((f) => ["-f", join(CHART, f)])]);
    assert.equal(r.code, 0, `helm lint ${files.join(" ")}:\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /1 chart\(s\) linted, 0 chart\(s\) failed/);
  }
});

describe("rendered objects", () => {
  for (const [label, files] of [
    ["default values", []],
    ["values-gpu.yaml", GPU_FILES],
  ] as const) {
    test(`every object rendered from ${label} validates against the Kubernetes schemas`, () => {
      const { objects } = render("rel", [...files]);
      for (const o of objects) validateObject(o);
      const kinds = objects.map((o) => o.kind).sort();
      assert.deepEqual(
        kinds.filter((k) => k !== "ConfigMap"),
        ["Job", "Job", "Job", "PersistentVolumeClaim", "Service", "Service", "Service"],
      );
    });
  }

  test("nats.deploy switches the NATS chart on and points every role at it; false leaves config.nats.url", () => {
    const deployed = render("rel", []);
    assert.ok(deployed.objects.some((o) => o.metadata.name === "nats-standin"));
    for (const role of ROLES) {
      assert.equal(loadConfig({ base: deployed.values.config, env: podEnv(deployed.container(role), 0) }).nats.url, "nats://rel-nats:4222");
    }
    const external = render("rel", GPU_FILES);
    assert.ok(!external.objects.some((o) => o.metadata.name === "nats-standin"));
    for (const role of ROLES) {
      assert.equal(
        loadConfig({ base: external.values.config, env: podEnv(external.container(role), 0) }).nats.url,
        "nats://nats.nats.svc:4222",
      );
    }
  });

  test("each pod's run config loads with the services' loader: addresses, shards, ids and run.dir per pod", () => {
    const r = render("l15", GPU_FILES, ["producer.replicas=3", "trainer.replicas=2"]);
    const bufferSvc = r.get<IService>("Service", "l15-saeflow-buffer-0");
    const bufferAddress = `${bufferSvc.metadata!.name}:${bufferSvc.spec!.ports![0]!.port}`;
    for (const role of ROLES) {
      const spec = r.job(role).spec!;
      assert.equal(spec.completionMode, "Indexed", role);
      assert.equal(spec.parallelism, spec.completions, role);
      for (let i = 0; i < spec.completions!; i++) {
        const c = r.container(role);
        const cfg = loadConfig({ base: r.values.config, env: podEnv(c, i) });
        assert.equal(cfg[role].address, `0.0.0.0:${c.ports![0]!.containerPort}`, `${role} ${i} binds its container port`);
        assert.equal(cfg.run.dir, "/var/lib/saeflow/llama31-8b-l15r");
        // One shard when values give none: the producers and trainers reach it at its Service.
        assert.deepEqual(
          shardsOf(cfg.buffer).map((s) => s.address),
          [bufferAddress],
          role,
        );
        if (role === "producer") assert.deepEqual([cfg.producer.shardIndex, cfg.producer.shardCount], [i, 3]);
        if (role === "trainer") {
          assert.deepEqual([cfg.trainer.id, cfg.trainer.shardIndex, cfg.trainer.shardCount], [`trainer-${i}`, i, 2]);
        }
        if (role === "buffer") {
          assert.deepEqual([cfg.buffer.shard, cfg.buffer.trainers], [0, 2]);
          assert.equal(cfg.buffer.stateFile, "", "no run claim on buffer pods: no state file, which would die with the pod");
        }
      }
    }
    assert.deepEqual(
      [r.job("producer").spec!.completions, r.job("trainer").spec!.completions, r.job("buffer").spec!.completions],
      [3, 2, 1],
    );
  });

  test("with the run claim on buffer pods, each shard keeps its ledger in a state file of its own there", () => {
    const r = render("rel", [], ["persistence.roles={trainer,buffer}"]);
    const c = r.container("buffer");
    assert.equal(loadConfig({ base: r.values.config, env: podEnv(c, 0) }).buffer.stateFile, "/var/lib/saeflow/demo/buffer-0.state.json");
    assert.equal(podEnv(c, 7).SAEFLOW_BUFFER__STATE_FILE, "/var/lib/saeflow/demo/buffer-7.state.json");
  });

  test("buffer.stateFile set in the values is kept: the chart adds its own only when none is given", () => {
    const r = render("rel", [], ["persistence.roles={trainer,buffer}", "config.buffer.stateFile=/var/lib/saeflow/mine.json"]);
    const c = r.container("buffer");
    assert.ok(!(c.env ?? []).some((e) => e.name === "SAEFLOW_BUFFER__STATE_FILE"));
    assert.equal(loadConfig({ base: r.values.config, env: podEnv(c, 0) }).buffer.stateFile, "/var/lib/saeflow/mine.json");
  });

  test("a config the role refuses (exit code 2) fails its Job at once; evictions do not count", () => {
    const r = render("rel", []);
    for (const role of ROLES) {
      const rules = r.job(role).spec!.podFailurePolicy!.rules;
      assert.deepEqual(rules[0], { action: "FailJob", onExitCodes: { containerName: role, operator: "In", values: [2] } }, role);
      assert.deepEqual(rules[1], { action: "Ignore", onPodConditions: [{ type: "DisruptionTarget", status: "True" }] }, role);
      assert.equal(r.job(role).spec!.template.spec!.restartPolicy, "Never", role);
    }
  });

  test("probes use grpc.health.v1: startup and liveness on the whole server, readiness on the role's service", () => {
    const r = render("rel", []);
    for (const role of ROLES) {
      const c = r.container(role);
      const port = c.ports![0]!.containerPort;
      assert.deepEqual(c.startupProbe?.grpc, { port, service: "" }, role);
      assert.deepEqual(c.livenessProbe?.grpc, { port, service: "" }, role);
      assert.deepEqual(c.readinessProbe?.grpc, { port, service: GRPC_SERVICE[role] }, role);
      const svc = r.get<IService>("Service", role === "buffer" ? "rel-saeflow-buffer-0" : `rel-saeflow-${role}`);
      assert.deepEqual([svc.spec!.ports![0]!.port, svc.spec!.ports![0]!.targetPort], [port, "grpc"]);
    }
  });

  test("the GPU run puts producers and trainers on GPUs with the cuda image and sizes the buffer from its pool", () => {
    const r = render("l15", GPU_FILES);
    for (const role of ["producer", "trainer"] as const) {
      const c = r.container(role);
      assert.equal(c.resources?.limits?.["nvidia.com/gpu"], 1, role);
      assert.match(c.image!, /:0\.1\.0-cuda$/, role);
      const spec = r.job(role).spec!.template.spec!;
      assert.deepEqual(spec.tolerations, [{ key: "nvidia.com/gpu", operator: "Exists", effect: "NoSchedule" }], role);
      assert.deepEqual(spec.nodeSelector, { "nvidia.com/gpu.present": "true" }, role);
    }
    const buffer = r.container("buffer");
    assert.match(buffer.image!, /:0\.1\.0-cpu$/);
    assert.equal(buffer.resources?.limits?.["nvidia.com/gpu"], undefined);
    // 4,194,304 rows x 4096 x 2 bytes (bf16) = 32768 MiB, plus the 4096 MiB overhead.
    assert.deepEqual(buffer.resources?.requests, { cpu: "8", memory: "36864Mi" });
    assert.deepEqual(buffer.resources?.limits, { memory: "36864Mi" });
    assert.deepEqual(r.job("buffer").spec!.template.spec!.nodeSelector, { "saeflow.dev/pool": "highmem" });
  });

  test("buffer memory follows every pool: rows x sum of widths x dtype bytes", () => {
    const r = render(
      "rel",
      [],
      [
        "config.buffer.dtype=fp16",
        "config.buffer.capacityRows=1000000",
        "config.buffer.hookPoints[0].name=a",
        "config.buffer.hookPoints[0].dModel=1024",
        "config.buffer.hookPoints[1].name=b",
        "config.buffer.hookPoints[1].dModel=2048",
        "buffer.memoryOverheadMiB=100",
      ],
    );
    // 1e6 x 3072 x 2 = 6,144,000,000 bytes = 5859.375 MiB, rounded up, + 100.
    assert.equal(r.container("buffer").resources?.requests?.memory, "5960Mi");
  });

  test("the model and dataset volumes are mounted read-only on producers only; the run claim on the roles named", () => {
    const r = render("l15", GPU_FILES);
    const producer = r.job("producer").spec!.template.spec!;
    assert.deepEqual(
      producer.volumes!.filter((v) => v.name === "model" || v.name === "dataset"),
      [
        { name: "model", persistentVolumeClaim: { claimName: "llama-3-1-8b-onnx", readOnly: true } },
        { name: "dataset", persistentVolumeClaim: { claimName: "fineweb-edu", readOnly: true } },
      ],
    );
    assert.deepEqual(
      producer.containers[0]!.volumeMounts!.filter((m) => m.readOnly && m.mountPath !== "/etc/saeflow/run.yaml").map((m) => m.mountPath),
      ["/models", "/datasets"],
    );
    for (const role of ["buffer", "trainer"] as const) {
      assert.ok(!r.job(role).spec!.template.spec!.volumes!.some((v) => v.name === "model"), role);
    }
    const runDir = (role: Role) => r.job(role).spec!.template.spec!.volumes!.find((v) => v.name === "run-dir");
    assert.deepEqual(runDir("trainer")?.persistentVolumeClaim, { claimName: "l15-saeflow-runs" });
    assert.deepEqual(runDir("producer")?.persistentVolumeClaim, { claimName: "l15-saeflow-runs" });
    assert.deepEqual(runDir("buffer")?.emptyDir, {});
  });

  test("a CA secret is mounted and trusted through NODE_EXTRA_CA_CERTS", () => {
    const r = render("rel", [], ["tls.caSecret=corp-ca"]);
    for (const role of ROLES) {
      const c = r.container(role);
      assert.equal(c.env!.find((e) => e.name === "NODE_EXTRA_CA_CERTS")?.value, "/etc/saeflow/tls/ca.crt", role);
      assert.ok(
        c.volumeMounts!.some((m) => m.name === "tls-ca" && m.mountPath === "/etc/saeflow/tls"),
        role,
      );
    }
  });

  test("NOTES print the port-forward, grpcurl status and health-watch commands", () => {
    const r = render("l15", GPU_FILES);
    const notes = r.get<IConfigMap>("ConfigMap", "notes-under-test").data!.notes!;
    for (const line of [
      "kubectl -n default port-forward svc/l15-saeflow-buffer-0 50051:50051",
      "grpcurl -plaintext localhost:50051 saeflow.buffer.v1.BufferService/Status",
      `grpcurl -plaintext -d '{"service":"saeflow.buffer.v1.BufferService"}' localhost:50051 grpc.health.v1.Health/Watch`,
      "get pod -o name -l app.kubernetes.io/instance=l15,app.kubernetes.io/component=trainer,batch.kubernetes.io/job-completion-index=0",
      "kubectl -n default port-forward $TRAINER 50071:50071",
      "grpcurl -plaintext localhost:50071 saeflow.trainer.v1.TrainerService/Status",
      "kubectl -n default port-forward $PRODUCER 50061:50061",
      "1 buffer shard(s) (36864Mi each)",
      "http://jaeger-collector.observability.svc:4318",
    ]) {
      assert.ok(notes.includes(line), `NOTES lack: ${line}\n${notes}`);
    }
  });
});

describe("bad values are refused with a message naming them", () => {
  const cases: Array<[string, string[], RegExp]> = [
    ["negative replicas", ["producer.replicas=-1"], /producer\.replicas: Must be greater than or equal to 1/],
    ["no trainer", ["trainer.replicas=0"], /trainer\.replicas: Must be greater than or equal to 1/],
    [
      "an unknown dtype in config",
      ["config.buffer.dtype=fp8"],
      /config\.buffer\.dtype: config\.buffer\.dtype must be one of the following: "fp32", "fp16", "bf16"/,
    ],
    ["a misspelt config key", ["config.trainer.batchsize=10"], /config\.trainer: Additional property batchsize is not allowed/],
    ["a missing model volume", ["modelVolume=null"], /modelVolume is required/],
    ["a model volume with two sources", ["modelVolume.hostPath.path=/m"], /modelVolume: Must have at most 1 properties/],
    ["an unsized buffer", ["config.buffer.capacityRows=null"], /config\.buffer: capacityRows is required/],
    ["a bad quantity", ["persistence.size=lots"], /persistence\.size/],
    [
      "a loopback NATS url without nats.deploy",
      ["nats.deploy=false", "config.nats.url=nats://127.0.0.1:4222"],
      /config\.nats\.url: "nats:\/\/127\.0\.0\.1:4222" cannot be reached from the pods/,
    ],
    [
      "a model outside the model volume",
      ["config.producer.model=model.onnx"],
      /config\.producer\.model: "model\.onnx" must be a path under \/models/,
    ],
    [
      "a dataset path without a dataset volume",
      ["config.producer.dataset[0]=/datasets/x.jsonl"],
      /config\.producer\.dataset\.0: "\/datasets\/x\.jsonl" must be builtin/,
    ],
    [
      "the cuda provider without a GPU",
      ["config.producer.executionProvider=cuda"],
      /config\.producer\.executionProvider is cuda but producer\.gpu is 0/,
    ],
    [
      "a shard given an address (the chart sets it)",
      ["config.buffer.shards[0].address=b:1", "config.buffer.shards[0].hookPoints={blocks.1.hook_resid_post}"],
      /config\.buffer\.shards\.0\.address: the chart sets each shard's address to its Service \(<release>-saeflow-buffer-0\)/,
    ],
    [
      "a shard naming no pool",
      ["config.buffer.shards[0].hookPoints={blocks.9.hook_mlp_out}"],
      /config\.buffer\.shards\.0\.hookPoints\.0: "blocks\.9\.hook_mlp_out" has no pool in config\.buffer\.hookPoints/,
    ],
    [
      "a shard without pools",
      ["config.buffer.shards[0].hookPoints=null"],
      /config\.buffer\.shards\.0\.hookPoints: Invalid type\. Expected: array, given: null/,
    ],
    [
      "one state file for several buffer shards",
      [
        "config.buffer.stateFile=/var/lib/saeflow/b.json",
        "config.buffer.shards[0].hookPoints={blocks.1.hook_resid_post}",
        "config.buffer.shards[1].hookPoints={blocks.1.hook_resid_post}",
      ],
      /config\.buffer\.stateFile: every buffer shard would keep its ledger in this one file/,
    ],
    [
      "a GPU provider for trainers without a GPU",
      ["config.trainer.executionProvider=webgpu"],
      /config\.trainer\.executionProvider is webgpu but trainer\.gpu is 0/,
    ],
  ];
  for (const [label, sets, message] of cases) {
    test(label, () => {
      const r = helm(["template", "rel", chart.dir, ...sets.flatMap((s) => ["--set", s])]);
      assert.notEqual(r.code, 0, `accepted: ${sets.join(" ")}`);
      assert.match(r.stderr, message);
    });
  }
});

test("the chart's appVersion is the package version, which tags the image", () => {
  const pkg = JSON.parse(readFileSync(new URL("../../package.json", import.meta.url), "utf8")) as { version: string };
  const meta = parseYaml(readFileSync(join(CHART, "Chart.yaml"), "utf8")) as { appVersion: string };
  assert.equal(meta.appVersion, pkg.version);
});
