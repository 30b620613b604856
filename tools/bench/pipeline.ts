import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { stringify } from "yaml";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { poolWidth } from "../../services/common/shards.js";
import { startNatsServer } from "../cli/nats-server.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { ArrayBatchSource, type Batch } from "../../services/trainer/batches.js";
import { startTrainer } from "../../services/trainer/trainer.js";
import { pretokenize, TOKENS_FIELD } from "../cli/pretokenize.js";
import { spawnRole, stopRole } from "../cli/processes.js";
import type { PipelineRecord } from "../cli/progress.js";
import { up } from "../cli/up.js";
import { bufferRowsPerSecond } from "./buffer.js";
import { line, round } from "./stats.js";

/**
 * The local run (deploy/configs/local.yaml, fewer steps) end to end through `saeflow up`, on the
 * builtin corpus as text and again pretokenized (the producer reading ids), beside each stage's own
 * rate measured alone in the same run: the producer pushing into a buffer nobody drains, the
 * trainer's sweep on in-memory batches, and the buffer's push → serve path.
 */
const root = resolve(import.meta.dirname, "../..");
const STEPS = 600;

function benchConfig(runDir: string, sets: string[] = []): RunConfig {
  return loadConfig({
    file: join(root, "deploy/configs/local.yaml"),
    sets: [
      `run.dir=${runDir}`,
      "run.id=bench",
      "launch.basePort=0",
      "launch.evaluate=false",
      "launch.report=false",
      `trainer.steps=${STEPS}`,
      "trainer.checkpointEvery=0",
      "trainer.exportOnFinish=false",
      ...sets,
    ],
  });
}

interface MetricsLine {
  step: number;
  tokens: number;
  elapsed_s: number;
  wait_ms: number;
}

/** The run, on the builtin corpus as text or, with `pretokenized`, as saeflow pretokenize writes it. */
async function pipeline(pretokenized = false): Promise<{ tokensPerS: number; waitFraction: number; holdFraction: number }> {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-bench-pipeline-"));
  try {
    const sets: string[] = [];
    if (pretokenized) {
      const corpus = join(runDir, "corpus.jsonl");
      await pretokenize(benchConfig(runDir).producer, corpus, () => undefined);
      sets.push(`producer.dataset=[${corpus}]`, `producer.tokensField=${TOKENS_FIELD}`);
    }
    const config = benchConfig(runDir, sets);
    const result = await up(root, config);
    if (!result.completed) throw new Error(`pipeline run did not complete: ${JSON.stringify(result.exits)}`);
    const lines = readFileSync(join(runDir, config.trainer.saes[0]!.name, "metrics.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as MetricsLine);
    const last = lines.at(-1)!;
    const waited = lines.reduce((a, l) => a + l.wait_ms, 0);
    const records = readFileSync(join(runDir, "pipeline.jsonl"), "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as PipelineRecord);
    return {
      tokensPerS: last.tokens / last.elapsed_s,
      waitFraction: waited / (last.elapsed_s * 1000),
      holdFraction: records.at(-1)!.bufferHoldFraction,
    };
  } finally {
    rmSync(runDir, { recursive: true, force: true });
  }
}

/** The producer unthrottled: a pool larger than what it sends in the window, and no trainer. */
async function producerAlone(): Promise<number> {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-bench-producer-"));
  const nats = await startNatsServer();
  try {
    const config = benchConfig(runDir, [`nats.url=${nats.url}`, "buffer.capacityRows=1048576"]);
    const configFile = join(runDir, "run.yaml");
    writeFileSync(configFile, stringify(config));
    const buffer = spawnRole(root, runDir, "buffer", "buffer", config.buffer.address, configFile, [`buffer.address=127.0.0.1:0`]);
    const [bufferAddress] = await waitForLine(buffer.log, /serving (\S+) for run/);
    const producer = spawnRole(root, runDir, "producer", "producer-0", "", configFile, [
      `buffer.address=${bufferAddress}`,
      "producer.address=127.0.0.1:0",
    ]);
    const [address] = await waitForLine(producer.log, /serving control on (\S+),/);
    const client = createClient(ProducerService, address!, config.transport);
    const sample = async () => {
      const s = await client.status({});
      return { t: performance.now(), tokens: Number(s.tokens) };
    };
    while ((await sample()).tokens === 0) await new Promise((r) => setTimeout(r, 100));
    const a = await sample();
    await new Promise((r) => setTimeout(r, 5000));
    const b = await sample();
    client.close();
    await stopRole(producer, 10_000);
    await stopRole(buffer, 10_000);
    return (b.tokens - a.tokens) / ((b.t - a.t) / 1000);
  } finally {
    await nats.stop();
    rmSync(runDir, { recursive: true, force: true });
  }
}

async function waitForLine(log: string, pattern: RegExp, timeoutMs = 60_000): Promise<string[]> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const text = (() => {
      try {
        return readFileSync(log, "utf8");
      } catch {
        return "";
      }
    })();
    const m = pattern.exec(text);
    if (m) return m.slice(1);
    if (Date.now() > end) throw new Error(`no ${pattern} in ${log}:\n${text}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** The trainer's sweep on batches already in memory: the trainer with a source that never waits. */
async function trainerAlone(): Promise<number> {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-bench-trainer-"));
  try {
    const config = benchConfig(runDir, [`trainer.steps=${STEPS / 2}`]);
    const { batchSize } = config.trainer;
    const dModel = poolWidth(config.buffer, config.trainer.hookPoints[0]!);
    const distinct = Array.from({ length: 8 }, (_, s): Batch => {
      const data = Float32Array.from({ length: batchSize * dModel }, (_, i) => Math.sin(i * 0.37 + s) * 3);
      return { data, dtype: "fp32", rows: batchSize, dModel, traceparent: "" };
    });
    const batches = Array.from({ length: config.trainer.steps }, (_, i) => distinct[i % distinct.length]!);
    const t0 = performance.now();
    const trainer = await startTrainer(config, { source: new ArrayBatchSource(batches), address: "127.0.0.1:0", log: () => undefined });
    const failure = await trainer.finished;
    const seconds = (performance.now() - t0) / 1000;
    await trainer.stop();
    if (failure) throw failure;
    return (config.trainer.steps * batchSize) / seconds;
  } finally {
    rmSync(runDir, { recursive: true, force: true });
  }
}

export async function run(): Promise<Record<string, number | string>> {
  const piped = await pipeline();
  const pipedIds = await pipeline(true);
  const producer = await producerAlone();
  const trainer = await trainerAlone();
  const buffer = await bufferRowsPerSecond(64, 64 << 20);
  const slowest = Math.min(producer, trainer, buffer);
  line("pipeline (saeflow up, trained tok/s)", piped.tokensPerS / 1e3, "ktok/s", { label: "slowest stage alone", value: slowest / 1e3 });
  line("pipeline, corpus pretokenized", pipedIds.tokensPerS / 1e3, "ktok/s", { label: "slowest stage alone", value: slowest / 1e3 });
  line("producer alone", producer / 1e3, "ktok/s");
  line("trainer alone (2-SAE sweep)", trainer / 1e3, "ktok/s");
  line("buffer alone (push→serve, d=64)", buffer / 1e3, "krows/s");
  line("trainer wait, fraction of wall time", piped.waitFraction, "");
  line("batches held for producers, fraction of wall", piped.holdFraction, "");
  // The settings every stage above ran with (read only: nothing is written to the run folder).
  const config = benchConfig(tmpdir());
  return {
    reference:
      "each stage alone, measured after the pipeline in the same run: the producer pushing into a buffer with room for all it sends (5 s), the trainer's sweep on batches in memory, the buffer's push -> serve at d=64",
    producer_threads: config.producer.threads,
    trainer_threads: config.trainer.threads,
    producer_nice: config.launch.producerNice,
    pipeline_tokens_per_s: Math.round(piped.tokensPerS),
    producer_alone_tokens_per_s: Math.round(producer),
    trainer_alone_tokens_per_s: Math.round(trainer),
    buffer_alone_rows_per_s: Math.round(buffer),
    trainer_wait_fraction: round(piped.waitFraction),
    buffer_hold_fraction: round(piped.holdFraction),
    pipeline_vs_slowest_stage_ratio: round(piped.tokensPerS / slowest),
    pipeline_vs_trainer_alone_ratio: round(piped.tokensPerS / trainer),
    pipeline_pretokenized_tokens_per_s: Math.round(pipedIds.tokensPerS),
    pipeline_pretokenized_trainer_wait_fraction: round(pipedIds.waitFraction),
    pipeline_pretokenized_vs_slowest_stage_ratio: round(pipedIds.tokensPerS / slowest),
  };
}
