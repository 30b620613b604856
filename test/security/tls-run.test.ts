import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { after, before, describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { cliConfig, type RunFile } from "../../tools/cli/run-file.js";
import { plaintext } from "./certs.js";

/**
 * `saeflow up --tls` on deploy/configs/tiny.yaml: the run trains under mTLS with certificates from
 * its own CA; `saeflow status`, `export` and `stop` reach it through run.json; every server turns a
 * plaintext client away; the run ends cleanly with its SAEs exported.
 */
const root = resolve(import.meta.dirname, "../..");
const run = promisify(execFile);
const cli = (...args: string[]) => run(process.execPath, ["--import", "tsx", "tools/cli/main.ts", ...args], { cwd: root });

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 120_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn().catch(() => undefined);
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

const SERVICE = { buffer: BufferService, producer: ProducerService, trainer: TrainerService } as const;

describe("a whole run under saeflow up --tls", { timeout: 300_000 }, () => {
  const runDir = mkdtempSync(join(tmpdir(), "saeflow-tls-run-"));
  let up: ChildProcess;
  let exited: Promise<number | null>;
  let output = "";
  let runFile: RunFile;

  before(async () => {
    const sets = [`run.dir=${runDir}`, "launch.evaluate=false", "launch.report=false", "trainer.steps=100000"];
    up = spawn(
      process.execPath,
      ["--import", "tsx", "tools/cli/main.ts", "up", "deploy/configs/tiny.yaml", "--tls", ...sets.flatMap((s) => ["--set", s])],
      { cwd: root, stdio: ["ignore", "pipe", "pipe"] },
    );
    up.stdout!.on("data", (d: Buffer) => (output += d.toString()));
    up.stderr!.on("data", (d: Buffer) => (output += d.toString()));
    exited = new Promise((r) => up.once("exit", (code) => r(code)));
    runFile = await until("run.json", async () =>
      existsSync(join(runDir, "run.json")) ? (JSON.parse(readFileSync(join(runDir, "run.json"), "utf8")) as RunFile) : undefined,
    );
    const trainer = runFile.services.find((s) => s.role === "trainer")!;
    // Past step 100, where tiny.yaml writes its first checkpoint, so export has one to read.
    await until("step 110", async () => {
      const client = createClient(TrainerService, trainer.address, cliConfig(runFile).transport);
      try {
        const st = await client.status({}, { deadline: Date.now() + 2000 });
        return Number(st.saes[0]?.step ?? 0) >= 110 ? true : undefined;
      } finally {
        client.close();
      }
    });
  });
  after(() => {
    if (up.exitCode === null) up.kill("SIGKILL");
    rmSync(runDir, { recursive: true, force: true });
  });

  it("writes where the CA and the operator's certificate are into run.json", () => {
    assert.ok(runFile.tls, output);
    for (const path of [runFile.tls.ca, runFile.tls.operator.cert, runFile.tls.operator.key, runFile.tls.exporter.cert]) {
      assert.ok(existsSync(path), path);
    }
    assert.match(readFileSync(runFile.tls.operator.cert, "utf8"), /BEGIN CERTIFICATE/);
  });

  it("has every server refuse a plaintext client while answering the operator", async () => {
    const operator = cliConfig(runFile).transport;
    for (const s of runFile.services) {
      const service = SERVICE[s.role];
      const plain = createClient(service, s.address, plaintext(operator));
      const err = await plain.status({}, { deadline: Date.now() + 3000 }).then(
        () => assert.fail(`${s.id} answered a plaintext client`),
        (e: { code: number }) => e,
      );
      plain.close();
      assert.equal(err.code, status.UNAVAILABLE, `${s.id}`);
      const client = createClient(service, s.address, operator);
      await client.status({}, { deadline: Date.now() + 5000 });
      client.close();
    }
  });

  it("serves saeflow status and export through run.json's certificates", async () => {
    const st = JSON.parse((await cli("status", runDir, "--json")).stdout) as Record<string, Array<{ id: string; error?: string }>>;
    for (const s of [...st.buffer!, ...st.producers!, ...st.trainers!]) assert.equal(s.error, undefined, `${s.id}: ${s.error}`);
    // The JumpReLU SAE calibrates on batches from the live buffer, called with a trainer's identity.
    const exported = (await cli("export", runDir)).stdout.trim().split("\n");
    assert.equal(exported.length, 3, exported.join("\n"));
    for (const dir of exported) assert.ok(existsSync(join(dir, "cfg.json")), dir);
  });

  it("stops on saeflow stop and ends the run cleanly", async () => {
    await cli("stop", runDir);
    assert.equal(await exited, 0, output);
    const trainerLog = readFileSync(join(runDir, "logs/trainer-0.log"), "utf8");
    assert.match(trainerLog, /stopped at step \d+; checkpoints in/);
    assert.doesNotMatch(readFileSync(join(runDir, "logs/buffer.log"), "utf8"), /refused|UNAUTHENTICATED|PERMISSION_DENIED/);
    for (const sae of ["jumprelu-k8", "matryoshka-k8", "gated"]) assert.ok(existsSync(join(runDir, sae, "sae_lens", "cfg.json")), sae);
  });
});
