import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { after, describe, it } from "node:test";
import { alive, faultRun, type FaultRun, figure, pidOf, readRunFile, removeRun, startUp, untilStep } from "./support.js";

// What `saeflow up` itself promises: its processes die with it, even when it is SIGKILLed, and a
// role that keeps crashing stops the run with a message and a non-zero exit once its budget is spent.
const runs: FaultRun[] = [];
const dirs: string[] = [];
after(() => {
  runs.forEach(removeRun);
  for (const d of dirs) rmSync(resolve(d, ".."), { recursive: true, force: true });
});
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("saeflow up as a supervisor", { timeout: 600_000 }, () => {
  it("leaves no process behind when it is SIGKILLed: roles see their pipe close and stop, nats-server gets its parent-death signal", async () => {
    const runDir = join(mkdtempSync(join(tmpdir(), "saeflow-fault-orphans-")), "run");
    dirs.push(runDir);
    const up = startUp(runDir, "orphans", []);
    await untilStep(runDir, 200, up.exited);
    const run = readRunFile(runDir);
    const pids = [...run.services.map((s) => ({ id: s.id, pid: s.pid })), { id: "nats-server", pid: run.natsPid! }];
    assert.ok(pids.every((p) => alive(p.pid)));
    const killedAt = Date.now();
    up.child.kill("SIGKILL");
    await up.exited;
    const gone = new Map<string, number>();
    while (gone.size < pids.length && Date.now() - killedAt < 60_000) {
      for (const p of pids) if (!gone.has(p.id) && !alive(p.pid)) gone.set(p.id, (Date.now() - killedAt) / 1000);
      await sleep(100);
    }
    assert.deepEqual(
      pids.filter((p) => !gone.has(p.id)).map((p) => p.id),
      [],
      "every process of the run ended",
    );
    figure(`CLI SIGKILLed: ${[...gone].map(([id, s]) => `${id} gone after ${s.toFixed(1)} s`).join(", ")}`);
  });

  it("stops the run with a message and a non-zero exit once a role's restart budget is spent", async () => {
    const r = await faultRun("budget", {
      at: 300,
      sets: ["launch.restarts=0"],
      inject: async (run) => void process.kill(pidOf(run, "trainer-0"), "SIGKILL"),
    });
    runs.push(r);
    assert.notEqual(r.code, 0, r.output);
    assert.match(
      r.output,
      /saeflow: trainer-0 exited with signal SIGKILL \(log: .*trainer-0\.log\); its restart budget is spent \(launch\.restarts = 0\): stopping the run/,
    );
    assert.deepEqual(
      r.events.map((e) => [e.who, e.event]),
      [["trainer-0", "gave_up"]],
    );
    const run = readRunFile(r.runDir);
    assert.ok(
      run.services.every((s) => !alive(s.pid)),
      "the other roles were stopped",
    );
  });
});
