import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, describe, it } from "node:test";
import { loadConfig } from "../../services/common/config/index.js";
import { freePort } from "../../tools/cli/nats-server.js";
import { handlingSignals } from "../../tools/cli/signals.js";
import { up } from "../../tools/cli/up.js";

// `saeflow up` with a config that cannot run: what it checks before starting anything, what it
// says when a role refuses the config at start, and that it leaves no report of a run that never
// trained and no signal handler behind.
const root = resolve(import.meta.dirname, "../..");
const CONFIG = "deploy/configs/local.yaml";

interface Ran {
  code: number | null;
  output: string;
  seconds: number;
}

function cliUp(sets: string[]): Promise<Ran> {
  const started = performance.now();
  const child = spawn(process.execPath, ["--import", "tsx", "tools/cli/main.ts", "up", CONFIG, ...sets.flatMap((s) => ["--set", s])], {
    cwd: root,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr.on("data", (d: Buffer) => (output += d.toString()));
  return new Promise((r) => child.once("close", (code) => r({ code, output, seconds: (performance.now() - started) / 1000 })));
}

describe("saeflow up with a config that cannot run", { timeout: 240_000 }, () => {
  const dirs: string[] = [];
  const runDir = (name: string) => {
    const dir = join(mkdtempSync(join(tmpdir(), `saeflow-up-${name}-`)), "run");
    dirs.push(dir);
    return dir;
  };
  after(() => {
    for (const dir of dirs) rmSync(resolve(dir, ".."), { recursive: true, force: true });
  });

  it("refuses a missing producer.model before starting anything", async () => {
    const dir = runDir("model");
    const missing = join(dir, "..", "no-such-model.onnx");
    const ran = await cliUp([`run.dir=${dir}`, "launch.basePort=0", `producer.model=${missing}`]);
    assert.equal(ran.code, 2, ran.output);
    assert.match(ran.output, /saeflow: producer\.model: .*no-such-model\.onnx does not exist/);
    // Starting NATS and three roles alone takes longer than this on any machine.
    assert.ok(ran.seconds < 60, `took ${ran.seconds.toFixed(1)} s`);
    assert.ok(!existsSync(dir), `the run folder was made: ${existsSync(dir) ? readdirSync(dir).join(", ") : ""}`);
    assert.doesNotMatch(ran.output, /report|evaluating/);
  });

  it("refuses a hook point the model does not have, naming the key", async () => {
    const dir = runDir("hook");
    const ran = await cliUp([
      `run.dir=${dir}`,
      "launch.basePort=0",
      "producer.hookPoints=[blocks.9.hook_resid_post]",
      "buffer.hookPoints=[{name: blocks.9.hook_resid_post, dModel: 64}]",
      "trainer.hookPoints=[blocks.9.hook_resid_post]",
    ]);
    assert.equal(ran.code, 2, ran.output);
    assert.match(ran.output, /saeflow: producer\.hookPoints: .*blocks\.9\.hook_resid_post/);
    assert.ok(!existsSync(join(dir, "logs")), "no role was started");
  });

  it("refuses a pretokenized file it would read as text before starting anything, naming the setting", async () => {
    const dir = runDir("pretokenized");
    const data = join(dir, "..", "ids.jsonl");
    writeFileSync(data, '{"input_ids":[1,2,3]}\n');
    writeFileSync(`${data}.meta.json`, JSON.stringify({ field: "input_ids", tokenizer: { source: "builtin:llama3_1", fingerprint: "x" } }));
    const ran = await cliUp([`run.dir=${dir}`, "launch.basePort=0", `producer.dataset=[${data}]`]);
    assert.equal(ran.code, 2, ran.output);
    assert.match(
      ran.output,
      /saeflow: producer\.tokensField: .*ids\.jsonl holds token ids \(saeflow pretokenize\) in "input_ids"; set producer\.tokensField=input_ids to read them/,
    );
    assert.ok(!existsSync(join(dir, "logs")), "no role was started");
  });

  it("says in the role's own words why it refused the config at start, and reports nothing", async () => {
    const dir = runDir("role");
    // A chunk of 128 contexts x 128 tokens x 64 fp32 is 4 MiB, over what 4 MiB messages carry: only
    // the producer, with the model open, knows the width that makes it so.
    const ran = await cliUp([`run.dir=${dir}`, "launch.basePort=0", "transport.maxMessageBytes=4194304", "producer.batchContexts=128"]);
    assert.equal(ran.code, 2, ran.output);
    assert.match(ran.output, /producer-0 exited with 2 \(log: .*producer-0\.log\):\n {2}producer: producer\.batchContexts: /);
    assert.match(ran.output, /before any trainer trained a step: no evaluation, no report/);
    assert.ok(existsSync(join(dir, "logs", "producer-0.log")));
    for (const file of ["report.html", "eval.json"]) assert.ok(!existsSync(join(dir, file)), `${file} written:\n${ran.output}`);
  });

  it("gives SIGINT and SIGTERM back when a role fails during start", async () => {
    const before = [process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")];
    const dir = runDir("signals");
    // Nothing listens there, so the buffer cannot join the run and exits during start-up.
    const natsUrl = process.env.NATS_URL;
    process.env.NATS_URL = `nats://127.0.0.1:${await freePort()}`;
    try {
      const config = loadConfig({ file: join(root, CONFIG), sets: [`run.dir=${dir}`, "launch.basePort=0"] });
      await assert.rejects(up(root, config), /during start-up, buffer exited with \d+ \(log: .*\):\n {2}buffer: /);
    } finally {
      if (natsUrl === undefined) delete process.env.NATS_URL;
      else process.env.NATS_URL = natsUrl;
    }
    assert.deepEqual([process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")], before);
  });

  it("handlingSignals removes its handlers however the body ends", async () => {
    const before = [process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")];
    const handler = () => undefined;
    await assert.rejects(
      handlingSignals(handler, async () => {
        assert.deepEqual([process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")], [before[0]! + 1, before[1]! + 1]);
        throw new Error("failed mid-run");
      }),
      /failed mid-run/,
    );
    assert.deepEqual([process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")], before);
    assert.equal(await handlingSignals(handler, async () => 7), 7);
    assert.deepEqual([process.listenerCount("SIGINT"), process.listenerCount("SIGTERM")], before);
  });
});
