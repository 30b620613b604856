import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { HookLedger } from "../../tools/cli/ledger.js";
import type { PipelineRecord } from "../../tools/cli/progress.js";
import type { RunFile } from "../../tools/cli/run-file.js";
import type { RunEvent } from "../../tools/cli/supervise.js";

/**
 * One short `saeflow up` run of deploy/configs/tiny.yaml (one TopK SAE, a small pool, status every
 * 0.5 s) with a fault injected once the trainers pass a step, as an operator would: by pid, from
 * run.json. What the tests read back: the exit, the CLI's output, its events and pipeline records,
 * final-status.json's ledger, and when training moved again after the fault.
 */
export const root = resolve(import.meta.dirname, "../..");
export const STEPS = 2000;
export const BATCH = 256;
export const SAE = "topk";

export interface FaultRun {
  runDir: string;
  code: number | null;
  output: string;
  /** When the fault was injected, and the step the trainers had reached then. */
  faultAt: number;
  stepAtFault: number;
  events: RunEvent[];
  pipeline: PipelineRecord[];
  ledger: HookLedger[];
  /** Seconds from the fault until a trainer took a step again (from the 0.5 s status polls). */
  trainingMovedAfterS: number | undefined;
}

export interface Fault {
  /** Step the trainers must have passed before the fault. */
  at: number;
  /** Injects the fault; `run` is run.json as it stands. */
  inject: (run: RunFile, runDir: string) => Promise<void>;
  sets?: string[];
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export const readJsonl = <T>(path: string): T[] =>
  existsSync(path)
    ? readFileSync(path, "utf8")
        .split("\n")
        .filter((l) => l.trim())
        .map((l) => JSON.parse(l) as T)
    : [];

export const pidOf = (run: RunFile, id: string): number => run.services.find((s) => s.id === id)!.pid;

export const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

/** `saeflow up` of deploy/configs/tiny.yaml with the fault suite's settings. */
export function startUp(
  runDir: string,
  name: string,
  sets: string[],
): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const all = [
    `run.dir=${runDir}`,
    `run.id=fault-${name}`,
    "launch.basePort=0",
    "launch.evaluate=false",
    "launch.report=false",
    "launch.statusEveryMs=500",
    // One onnxruntime thread per role: producer and trainer share two cores here.
    "producer.threads=1",
    "trainer.threads=1",
    "buffer.capacityRows=8192",
    `trainer.steps=${STEPS}`,
    `trainer.batchSize=${BATCH}`,
    "trainer.checkpointEvery=100",
    "trainer.keepCheckpoints=20",
    "trainer.logEvery=20",
    `trainer.saes=[{name: ${SAE}, recipe: topk, width: 128, k: 8, lr: 0.004}]`,
    ...sets,
  ];
  return spawnUp("deploy/configs/tiny.yaml", all);
}

/** `saeflow up CONFIG --set ...` as a child process, its output gathered. */
export function spawnUp(config: string, sets: string[]): { child: ChildProcess; output: () => string; exited: Promise<number | null> } {
  const child = spawn(process.execPath, ["--import", "tsx", "tools/cli/main.ts", "up", config, ...sets.flatMap((s) => ["--set", s])], {
    cwd: root,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout!.on("data", (d: Buffer) => (output += d.toString()));
  child.stderr!.on("data", (d: Buffer) => (output += d.toString()));
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  return { child, output: () => output, exited };
}

/** Waits until pipeline.jsonl shows the trainers past `step`; fails when the run ends first. */
export async function untilStep(runDir: string, step: number, exited: Promise<unknown>): Promise<PipelineRecord> {
  let over = false;
  void exited.then(() => (over = true));
  for (;;) {
    const last = readJsonl<PipelineRecord>(join(runDir, "pipeline.jsonl")).at(-1);
    if (last && last.step >= step) return last;
    if (over) throw new Error(`the run ended before step ${step}`);
    await sleep(200);
  }
}

export const readRunFile = (runDir: string): RunFile => JSON.parse(readFileSync(join(runDir, "run.json"), "utf8")) as RunFile;

/** A run with one fault: starts it, injects the fault past `fault.at`, waits for the end. */
export async function faultRun(name: string, fault: Fault): Promise<FaultRun> {
  const runDir = join(mkdtempSync(join(tmpdir(), `saeflow-fault-${name}-`)), "run");
  const up = startUp(runDir, name, fault.sets ?? []);
  const reached = await untilStep(runDir, fault.at, up.exited);
  const faultAt = Date.now();
  await fault.inject(readRunFile(runDir), runDir);
  const code = await up.exited;
  const pipeline = readJsonl<PipelineRecord>(join(runDir, "pipeline.jsonl"));
  const final = existsSync(join(runDir, "final-status.json"))
    ? (JSON.parse(readFileSync(join(runDir, "final-status.json"), "utf8")) as { ledger: HookLedger[] })
    : { ledger: [] };
  return {
    runDir,
    code,
    output: up.output(),
    faultAt,
    stepAtFault: reached.step,
    events: readJsonl<RunEvent>(join(runDir, "events.jsonl")),
    pipeline,
    ledger: final.ledger,
    trainingMovedAfterS: movedAfter(pipeline, faultAt, reached.step),
  };
}

/**
 * Seconds from `at` to the first poll after it at which the trainers' step had moved: past where it
 * was at the fault, or (once the trainer answers again after a restart from an earlier checkpoint)
 * past where it stood at the poll before.
 */
export function movedAfter(pipeline: PipelineRecord[], at: number, stepAtFault: number): number | undefined {
  let before: number | undefined;
  for (const r of pipeline.filter((p) => p.t > at)) {
    if (r.down?.some((d) => d.startsWith("trainer"))) continue;
    if (r.step > (before ?? stepAtFault)) return (r.t - at) / 1000;
    before = r.step;
  }
  return undefined;
}

/** The SAE's metrics lines: step, tokens and mse of each logged window. */
export const metricsOf = (runDir: string) => readJsonl<{ step: number; tokens: number; mse: number }>(join(runDir, SAE, "metrics.jsonl"));

/** Removes the run folder's parent (made by mkdtemp). */
export const removeRun = (r: FaultRun | undefined) => r && rmSync(resolve(r.runDir, ".."), { recursive: true, force: true });

/** Reports a measured figure in the test output (node's runner prints diagnostics). */
export const figure = (line: string) => process.stdout.write(`figure: ${line}\n`);
