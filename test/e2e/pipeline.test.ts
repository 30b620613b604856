import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, before, describe, it } from "node:test";
import { loadSaeLens } from "../../services/trainer/export.js";
import { OtlpReceiver, type ReceivedSpan } from "../support/otlp-receiver.js";

// The main job end to end: `saeflow up` starts nats-server, the buffer, a producer and a trainer as
// real processes on loopback, trains a sweep of two SAEs on the tiny model, evaluates, reports.
const root = resolve(import.meta.dirname, "../..");
const STEPS = 40;
const BATCH = 256;

interface JsonStatus {
  buffer: Array<{
    status: { hookPoints: Array<{ rowsIn?: string; rowsOut?: string; unconsumedRows?: string; dropped?: Array<{ rows?: string }> }> };
  }>;
  producers: Array<{ status: { rowsSent?: string } }>;
}

describe("saeflow up, end to end", { timeout: 300_000 }, () => {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-e2e-"));
  const receiver = new OtlpReceiver();
  let exitCode: number | null = null;
  let output = "";

  before(async () => {
    const endpoint = await receiver.start();
    const sets = [
      `run.dir=${runDir}`,
      "run.id=e2e",
      "launch.basePort=0",
      "launch.evalContexts=2",
      "buffer.capacityRows=8192",
      "producer.batchContexts=8",
      `trainer.steps=${STEPS}`,
      `trainer.batchSize=${BATCH}`,
      "trainer.lrWarmupSteps=5",
      "trainer.logEvery=5",
      "trainer.checkpointEvery=20",
      "trainer.saes=[{name: topk-k4, recipe: topk, width: 128, k: 4, lr: 0.004}, {name: relu, recipe: relu, width: 128, lr: 0.004, l1Coefficient: 0.5}]",
    ];
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "tools/cli/main.ts", "up", "deploy/configs/local.yaml", ...sets.flatMap((s) => ["--set", s])],
      {
        cwd: root,
        env: { ...process.env, OTEL_EXPORTER_OTLP_ENDPOINT: endpoint },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    child.stdout.on("data", (d: Buffer) => (output += d.toString()));
    child.stderr.on("data", (d: Buffer) => (output += d.toString()));
    exitCode = await new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  });
  after(() => receiver.stop());

  it("finishes the run", () => {
    assert.equal(exitCode, 0, output);
    for (const file of ["run.yaml", "run.json", "pipeline.jsonl", "final-status.json", "eval.json", "report.html"]) {
      assert.ok(existsSync(join(runDir, file)), `${file} missing:\n${output}`);
    }
  });

  it("lowers each SAE's loss", () => {
    for (const sae of ["topk-k4", "relu"]) {
      const lines = readFileSync(join(runDir, sae, "metrics.jsonl"), "utf8")
        .trim()
        .split("\n")
        .map((l) => JSON.parse(l) as { step: number; mse: number });
      assert.equal(lines.at(-1)!.step, STEPS);
      assert.ok(lines.at(-1)!.mse < lines[0]!.mse * 0.8, `${sae}: mse ${lines[0]!.mse} -> ${lines.at(-1)!.mse}`);
    }
  });

  it("reconciles rows across producer, buffer and trainer", () => {
    const st = JSON.parse(readFileSync(join(runDir, "final-status.json"), "utf8")) as JsonStatus;
    const hook = st.buffer[0]!.status.hookPoints[0]!;
    const n = (s: string | undefined) => Number(s ?? 0);
    const dropped = (hook.dropped ?? []).reduce((a, d) => a + n(d.rows), 0);
    const sent = st.producers.reduce((a, p) => a + n(p.status.rowsSent), 0);
    assert.ok(sent > 0);
    assert.equal(sent, n(hook.rowsIn) + dropped, "rows the producer sent = rows the buffer pooled + dropped");
    assert.equal(n(hook.rowsIn), n(hook.rowsOut) + n(hook.unconsumedRows), "pooled = served + held");
    // The trainer has exited by the snapshot (so has its stream); its own record of what it trained
    // is metrics.jsonl. With one fan-out trainer, rows served are the rows streamed to it.
    const streamed = n(hook.rowsOut);
    for (const sae of ["topk-k4", "relu"]) {
      const last = JSON.parse(
        readFileSync(join(runDir, sae, "metrics.jsonl"), "utf8")
          .trim()
          .split("\n")
          .at(-1)!,
      ) as { tokens: number };
      assert.equal(last.tokens, STEPS * BATCH, `${sae} trained on every row of every step`);
      assert.ok(streamed >= last.tokens, `the trainer trained only on rows the buffer streamed to it (${streamed})`);
    }
  });

  it("ends by itself once its trainer is done, with a ledger that reconciles in final-status.json and the report", () => {
    // The trainer says it is done over NATS; the buffer then stops the producer and ends: no drain, no signal.
    assert.match(
      readFileSync(join(runDir, "logs", "buffer.log"), "utf8"),
      /trainer-0 is done with blocks.1.hook_resid_post at step 40; every trainer reading it is done/,
    );
    assert.match(
      readFileSync(join(runDir, "logs", "producer-0.log"), "utf8"),
      /is draining \(every trainer is done\); stopping|every pool this producer feeds on .* is done/,
    );
    assert.doesNotMatch(output, /did not end by themselves/);
    const { ledger } = JSON.parse(readFileSync(join(runDir, "final-status.json"), "utf8")) as {
      ledger: Array<{
        produced: number;
        accepted: number;
        served: number;
        held: number;
        producedReconciles: boolean;
        acceptedReconciles: boolean;
      }>;
    };
    assert.equal(ledger.length, 1);
    assert.ok(ledger[0]!.produced > 0 && ledger[0]!.producedReconciles && ledger[0]!.acceptedReconciles, JSON.stringify(ledger));
    assert.match(
      output,
      /saeflow: rows blocks\.1\.hook_resid_post: produced \d+ = accepted \d+ \+ refused \d+.*; accepted = served \d+ \+ held \d+ \+ lost 0/,
    );
    assert.match(readFileSync(join(runDir, "report.html"), "utf8"), /<h2>Rows ledger per hook point/);
  });

  it("exports SAELens folders that load back, evaluates them and draws the report", () => {
    for (const sae of ["topk-k4", "relu"]) {
      const loaded = loadSaeLens(join(runDir, sae, "sae_lens"));
      assert.equal(loaded.cfg.d_in, 64);
      assert.equal(loaded.cfg.d_sae, 128);
      assert.equal(loaded.cfg.hook_name, "blocks.1.hook_resid_post");
    }
    const rows = JSON.parse(readFileSync(join(runDir, "eval.json"), "utf8")) as Array<{
      sae: string;
      lm_loss_sae: number;
      kl_divergence: number;
    }>;
    assert.deepEqual(rows.map((r) => r.sae).sort(), ["relu", "topk-k4"]);
    for (const r of rows) assert.ok(Number.isFinite(r.lm_loss_sae) && r.kl_divergence >= 0);
    const html = readFileSync(join(runDir, "report.html"), "utf8");
    assert.ok((html.match(/<svg/g) ?? []).length >= 5, "report holds the charts");
  });

  it("exports spans from every role, linked producer → buffer → trainer", () => {
    const spans = receiver.spans;
    const byId = new Map(spans.map((s) => [s.spanId, s]));
    const services = new Set(spans.map((s) => s.service));
    for (const svc of ["saeflow-producer", "saeflow-buffer", "saeflow-trainer"]) assert.ok(services.has(svc), `no spans from ${svc}`);
    const named = (name: string) => spans.filter((s) => s.name === name);
    for (const name of ["producer.forward", "producer.push", "buffer.refill_cycle", "buffer.batch", "trainer.step"]) {
      assert.ok(named(name).length > 0, `no ${name} span among ${[...new Set(spans.map((s) => s.name))].join(", ")}`);
    }
    const parentOf = (s: ReceivedSpan) => byId.get(s.parentSpanId);
    assert.ok(
      named("producer.forward").some((s) => parentOf(s)?.name === "producer.produce"),
      "forward is a child of produce",
    );
    const linkedTo = (s: ReceivedSpan, name: string) => s.links.some((l) => byId.get(l.spanId)?.name === name);
    assert.ok(
      named("buffer.refill_cycle").some((s) => linkedTo(s, "producer.forward")),
      "a refill cycle links the producer passes that filled it",
    );
    assert.ok(
      named("trainer.step").some((s) => linkedTo(s, "buffer.refill_cycle") || linkedTo(s, "buffer.batch")),
      "a train step links back into the buffer",
    );
  });
});
