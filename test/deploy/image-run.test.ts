import assert from "node:assert/strict";
import { chmodSync, cpSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { stringify } from "yaml";
import { loadSaeLens } from "../../services/trainer/export.js";
import { freePort, type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";
import { buildTarget, type Built } from "../../tools/image/build.js";
import { Container, type InContainer, imageConfig } from "../../tools/image/container.js";
import { type BaseImages, localBases, ROOT } from "../../tools/image/local-base.js";
import { makeTinyLlama } from "../../tools/model/tiny-llama.js";
import { helm, offlineChart, parseManifests, type K8sObject } from "./chart.js";
import { type PodPlan, podPlans, serviceAddresses } from "./image-pods.js";

/**
 * The image the chart deploys, built and run: the cpu target of deploy/docker/Dockerfile on a local
 * Debian base (debootstrap, cached in .cache/image/; .ci/run installs buildah, podman and debootstrap),
 * then a whole small run with every role started from it as the chart runs it: the Jobs `helm
 * template` renders give each container's args, env, user, capabilities and volume mounts; nats-server
 * runs on the host, whose network the containers share. The cuda target is built as far as this
 * machine's network allows.
 */

const TAG = "localhost/saeflow-test:cpu";
const RELEASE = "img";
const RUN_ID = "image-test";
const STEPS = 20;
const SAE = "topk-k4";
const HOOK = "blocks.1.hook_resid_post";
const log = (line: string) => void process.stderr.write(`image test: ${line}\n`);

let bases: BaseImages;
let built: Built;
const scratch = mkdtempSync(join(tmpdir(), "saeflow-image-test-"));

before(async () => {
  const started = Date.now();
  await Container.removeStale("saeflow-image-test-");
  bases = await localBases(log);
  built = await buildTarget({ target: "cpu", tag: TAG, bases, timeoutMs: 900_000, log });
  log(`bases and cpu image in ${((Date.now() - started) / 1000).toFixed(1)} s`);
});

after(() => rmSync(scratch, { recursive: true, force: true }));

describe("the cpu image", { timeout: 1_200_000 }, () => {
  test("builds from deploy/docker/Dockerfile", () => {
    assert.equal(built.code, 0, built.output.slice(-8000));
  });

  test("holds the services, their production dependencies and node alone, and runs as uid 10001", async () => {
    assert.equal(built.code, 0, "the build failed");
    const config = await imageConfig(TAG);
    assert.equal(config.User, "10001:10001");
    assert.deepEqual(config.Entrypoint, ["tini", "--", "node", "--import", "tsx"]);
    assert.equal(config.WorkingDir, "/app");
    // Packages npm installs for development alone (dev dependencies and theirs), per the lockfile.
    const lock = JSON.parse(readFileSync(join(ROOT, "package-lock.json"), "utf8")) as { packages: Record<string, { dev?: boolean }> };
    const devOnly = Object.entries(lock.packages)
      .filter(([path, entry]) => entry.dev && /^node_modules\/(@[^/]+\/)?[^/]+$/.test(path))
      .map(([path]) => path.slice("node_modules/".length));
    const c = await Container.from(TAG, `saeflow-image-test-contents-${process.pid}`);
    try {
      const script = 'ls -A /app; echo ---; ls -d node_modules/* node_modules/@*/*; echo ---; command -v npm || echo "no npm"';
      const p = c.run({ user: "10001:10001", argv: ["sh", "-c", script] });
      assert.equal(await p.exited, 0, p.output());
      const [app, modules, npm] = p
        .output()
        .split("---\n")
        .map((s) => s.trim().split("\n"));
      assert.deepEqual(app, ["node_modules", "package-lock.json", "package.json", "services", "tsconfig.json"]);
      const present = new Set(modules!.map((m) => m.replace(/^node_modules\//, "")));
      assert.ok(devOnly.includes("typescript") && devOnly.includes("eslint"), "the lockfile marks dev packages");
      assert.deepEqual(
        devOnly.filter((d) => present.has(d)),
        [],
        "packages only development needs are in the image",
      );
      for (const d of ["@grpc/grpc-js", "onnxruntime-node", "tsx"]) assert.ok(present.has(d), `${d} missing from the image`);
      assert.deepEqual(npm, ["no npm"], "the runtime image carries node alone");
    } finally {
      await c.remove();
    }
  });

  test("runs a whole training run with every role started from the image as the chart runs it", async () => {
    assert.equal(built.code, 0, "the build failed");
    await runFromImage();
  });
});

describe("the cuda image", { timeout: 600_000 }, () => {
  test("builds up to the one step that downloads onnxruntime's CUDA provider from NuGet", async () => {
    const r = await buildTarget({ target: "cuda", tag: "localhost/saeflow-test:cuda", bases, timeoutMs: 300_000, log });
    const stage = (name: string) => new RegExp(`STEP 1/\\d+: FROM \\S+ AS ${name}$`, "m");
    for (const name of ["node", "deps", "cuda-runtime", "deps-cuda"]) assert.match(r.output, stage(name), `stage ${name} never began`);
    if (r.code === 0) {
      // A machine that reaches api.nuget.org builds the whole target.
      const c = await Container.from("localhost/saeflow-test:cuda", `saeflow-image-test-cuda-${process.pid}`);
      try {
        const p = c.run({ user: "10001:10001", argv: ["ls", "node_modules/onnxruntime-node/bin/napi-v6/linux/x64/"] });
        assert.equal(await p.exited, 0, p.output());
        assert.match(p.output(), /libonnxruntime_providers_cuda\.so/);
      } finally {
        await c.remove();
      }
      return;
    }
    // Here it stops at that step, and only there, for want of the network.
    const failed = [...r.output.matchAll(/^Error: building at STEP "([^"]+)"/gm)].map((m) => m[1]);
    assert.deepEqual([...new Set(failed)], [failed[0]], r.output.slice(-4000));
    assert.match(
      failed[0] ?? "",
      /^RUN ONNXRUNTIME_NODE_INSTALL=cuda12 node node_modules\/onnxruntime-node\/script\/install\.js/,
      r.output.slice(-4000),
    );
    assert.match(r.output, /api\.nuget\.org/);
  });
});

/** The chart rendered with a tiny run, the roles on free ports, NATS_URL as the chart sets it. */
function renderChart(ports: Record<string, number>): K8sObject[] {
  const values = {
    config: {
      run: { id: RUN_ID, seed: 0 },
      nats: { url: "nats://nats:4222" },
      buffer: { dtype: "fp32", hookPoints: [{ name: HOOK, dModel: 64 }], capacityRows: 8192 },
      producer: {
        model: "/models/tiny-llama/model.onnx",
        tokenizer: "builtin:llama3_1",
        dataset: ["builtin:corpus"],
        hookPoints: [HOOK],
        dtype: "fp32",
        contextLength: 128,
        batchContexts: 8,
        threads: 1,
      },
      trainer: {
        hookPoints: [HOOK],
        batchSize: 256,
        steps: STEPS,
        lrWarmupSteps: 5,
        logEvery: 5,
        checkpointEvery: 10,
        threads: 1,
        saes: [{ name: SAE, recipe: "topk", width: 128, k: 4, lr: 0.004 }],
      },
    },
    // The chart sets buffer.trainers, so the buffer would end the run as soon as the trainer is done,
    // before the health probe has seen every role; 0 leaves the end to SIGTERM, which this test checks.
    buffer: { port: ports.buffer, env: [{ name: "SAEFLOW_BUFFER__TRAINERS", value: "0" }] },
    producer: { port: ports.producer },
    trainer: { port: ports.trainer },
  };
  const file = join(scratch, "values.yaml");
  writeFileSync(file, stringify(values));
  const chart = offlineChart();
  try {
    const r = helm(["template", RELEASE, chart.dir, "-f", file]);
    assert.equal(r.code, 0, r.stderr);
    return parseManifests(r.stdout);
  } finally {
    chart.close();
  }
}

interface Pod {
  plan: PodPlan;
  container: Container;
  process: InContainer;
}

async function startPod(plan: PodPlan, entrypoint: string[]): Promise<Pod> {
  const container = await Container.from(TAG, `saeflow-image-test-${plan.role}-${process.pid}`);
  const p = container.run({
    user: plan.user,
    env: plan.env,
    mounts: plan.mounts,
    capDrop: plan.capDrop,
    argv: [...entrypoint, ...plan.args],
  });
  return { plan, container, process: p };
}

/** Resolves with the exit code, or fails naming the pod when it runs past `ms`. */
async function exitOf(pod: Pod, ms: number): Promise<number | null> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${pod.plan.role} still running after ${ms} ms:\n${pod.process.output().slice(-4000)}`)), ms);
  });
  try {
    return await Promise.race([pod.process.exited, late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `waiting`, unless a pod ends first: the buffer and the producer run until stopped, and the trainer
 * may end only with exit code 0.
 */
async function guarded<T>(pods: Pod[], waiting: Promise<T>): Promise<T> {
  const failed = pods.map(async (pod) => {
    const code = await pod.process.exited;
    if (pod.plan.role !== "trainer" || code !== 0) {
      throw new Error(`${pod.plan.role} exited with ${code} during the run:\n${pod.process.output().slice(-6000)}`);
    }
    return new Promise<never>(() => undefined);
  });
  return Promise.race([waiting, ...failed]);
}

/** Lines the health probe prints, in order; `until` resolves once one passes the test, and fails once the probe has ended. */
function lines(p: InContainer): {
  until(match: (line: { role: string; service: string; status: string }) => boolean, ms: number): Promise<void>;
} {
  let ended = false;
  void p.exited.then(() => (ended = true));
  return {
    until: async (match, ms) => {
      const deadline = Date.now() + ms;
      for (;;) {
        const seen = p
          .output()
          .split("\n")
          .filter((l) => l.startsWith("{"))
          .map((l) => JSON.parse(l) as { role: string; service: string; status: string });
        if (seen.some(match)) return;
        if (ended || Date.now() > deadline) throw new Error(`health probe: no such line within ${ms} ms:\n${p.output().slice(-4000)}`);
        await new Promise((r) => setTimeout(r, 200));
      }
    },
  };
}

async function runFromImage(): Promise<void> {
  const started = Date.now();
  const runs = join(scratch, "runs");
  const nats = await startNatsServer();
  const running: Array<{ container: Container; process: InContainer }> = [];
  try {
    const plans = await planPods(runs, nats);
    const entrypoint = (await imageConfig(TAG)).Entrypoint ?? [];
    const [buffer, trainer, producer] = await startWatched(plans, entrypoint, running);
    assert.equal(await exitOf(trainer, 300_000), 0, `trainer:\n${trainer.process.output().slice(-4000)}`);
    for (const pod of [producer, buffer]) {
      // The run is over: what the kubelet does when the Jobs are deleted, SIGTERM to each container's PID 1.
      assert.ok(pod.process.signal("tini", "SIGTERM"), `${pod.plan.role}: no tini under buildah run`);
      assert.equal(await exitOf(pod, 60_000), 0, `${pod.plan.role}:\n${pod.process.output().slice(-4000)}`);
    }
    for (const pod of [producer, trainer]) {
      assert.doesNotMatch(pod.process.output(), /telemetry/i, "the image turns onnxruntime's telemetry off");
    }
    log(`the run from the image took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    checkExports(runs);
    await checkReadOnlyRoot([buffer, trainer, producer]);
  } finally {
    await Promise.all(running.map((r) => r.process.kill()));
    await Promise.all(running.map((r) => r.container.remove()));
    await nats.stop();
  }
}

/** The chart's pods for a tiny run on `nats`, with the run claim at `runs` and the tiny model as the model volume. */
async function planPods(runs: string, nats: NatsServer): Promise<Map<string, PodPlan>> {
  const models = join(scratch, "models");
  mkdirSync(runs, { recursive: true });
  // tools/ is not in the image: the model is generated here and mounted where the chart mounts modelVolume.
  const tiny = makeTinyLlama({ out: join(ROOT, ".cache/tiny-llama") });
  cpSync(tiny.dir, join(models, "tiny-llama"), { recursive: true });
  const objects = renderChart({ buffer: await freePort(), producer: await freePort(), trainer: await freePort() });
  const services: Record<string, number> = {};
  for (const address of serviceAddresses(objects)) services[address] = Number(address.split(":").at(-1));
  const plans = podPlans({ objects, claims: { [`${RELEASE}-saeflow-runs`]: runs, "saeflow-models": models }, services, scratch });
  assert.deepEqual([...plans.keys()].sort(), ["buffer", "producer", "trainer"]);
  // With nats.deploy the chart points NATS_URL at the NATS Service it installs; here that is the host's server.
  const natsHost = new URL(plans.get("buffer")!.env.NATS_URL!).host;
  for (const plan of plans.values()) plan.env.NATS_URL = plan.env.NATS_URL!.replace(natsHost, `127.0.0.1:${nats.port}`);
  return plans;
}

/**
 * Starts the buffer, the trainer and the health probe, then the producer once the probe watches the
 * trainer (which turns SERVING only once batches flow, and may finish soon after); resolves with the
 * pods [buffer, trainer, producer] once the probe saw every role answer SERVING.
 */
async function startWatched(
  plans: Map<string, PodPlan>,
  entrypoint: string[],
  running: Array<{ container: Container; process: InContainer }>,
): Promise<[Pod, Pod, Pod]> {
  const pods: Pod[] = [];
  const start = async (role: string) => {
    const pod = await startPod(plans.get(role)!, entrypoint);
    running.push(pod);
    pods.push(pod);
  };
  await start("buffer");
  await start("trainer");
  const probe = await startProbe(plans, entrypoint);
  running.push(probe);
  const watching = lines(probe.process);
  await guarded(
    pods,
    watching.until((l) => l.role === "trainer" && l.service === "", 180_000),
  );
  await guarded(
    pods,
    watching.until((l) => l.role === "trainer" && l.service !== "", 30_000),
  );
  await start("producer");
  assert.equal(await guarded(pods, probe.process.exited), 0, `health probe:\n${probe.process.output()}`);
  const seen = new Set(probe.process.output().match(/^\{.*"status":"SERVING"\}$/gm));
  for (const plan of plans.values()) {
    for (const probed of [plan.startup, plan.readiness]) {
      const line = JSON.stringify({ role: plan.role, service: probed.service, status: "SERVING" });
      assert.ok(seen.has(line), `${plan.role} "${probed.service}" never answered SERVING`);
    }
  }
  return pods as [Pod, Pod, Pod];
}

/** The health probe in a container of the image, watching what the chart's probes ask for. */
async function startProbe(plans: Map<string, PodPlan>, entrypoint: string[]): Promise<{ container: Container; process: InContainer }> {
  const buffer = plans.get("buffer")!;
  const targets = [...plans.values()].flatMap((p) =>
    [p.startup, p.readiness].map((probed) => `${p.role}=127.0.0.1:${probed.port}=${probed.service}`),
  );
  const container = await Container.from(TAG, `saeflow-image-test-probe-${process.pid}`);
  const tmp = join(scratch, "probe-tmp");
  mkdirSync(tmp);
  chmodSync(tmp, 0o777);
  const running = container.run({
    user: buffer.user,
    capDrop: ["ALL"],
    mounts: [
      { source: join(ROOT, "tools/image"), target: "/app/tools/image", readOnly: true },
      ...buffer.mounts.filter((m) => m.target === "/etc/saeflow/run.yaml"),
      { source: tmp, target: "/tmp", readOnly: false },
    ],
    argv: [
      ...entrypoint,
      "tools/image/health-probe.ts",
      "--config",
      "/etc/saeflow/run.yaml",
      "--timeout-ms",
      "400000",
      ...targets.flatMap((t) => ["--target", t]),
    ],
  });
  return { container, process: running };
}

/** The trainer's exports and metrics, written as uid 10001 into the folder mounted as the run claim. */
function checkExports(runs: string): void {
  const dir = join(runs, RUN_ID, SAE);
  const loaded = loadSaeLens(join(dir, "sae_lens"));
  assert.equal(loaded.cfg.d_in, 64);
  assert.equal(loaded.cfg.d_sae, 128);
  assert.equal(loaded.cfg.hook_name, HOOK);
  const metrics = readFileSync(join(dir, "metrics.jsonl"), "utf8").trim().split("\n");
  assert.equal((JSON.parse(metrics.at(-1)!) as { step: number }).step, STEPS);
  const owner = statSync(join(dir, "sae_lens/cfg.json"));
  assert.deepEqual([owner.uid, owner.gid], [10001, 10001]);
}

/**
 * The pods run with readOnlyRootFilesystem, which buildah run cannot set: instead, what each role's
 * container layer holds afterwards is checked to be nothing but the mount points buildah made.
 */
async function checkReadOnlyRoot(pods: Pod[]): Promise<void> {
  for (const pod of pods) {
    const mountPoints = new Set(
      pod.plan.mounts.flatMap((m) => m.target.split("/").map((_, i, parts) => parts.slice(0, i + 1).join("/") || "/")),
    );
    const written = (await pod.container.changes()).filter((line) => !mountPoints.has(line.slice(2)));
    assert.deepEqual(written, [], `${pod.plan.role} wrote into its image's filesystem`);
  }
}
