import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { type FaultRun, faultRun, figure, metricsOf, movedAfter, pidOf, removeRun, STEPS } from "./support.js";

// Coordination faults through `saeflow up`: the nats-server killed (the CLI restarts it on its port,
// every role reconnects), and a producer frozen past the lapse time (its membership lapses, its
// credit goes back, and it is a member again when it thaws).
const runs: FaultRun[] = [];
after(() => runs.forEach(removeRun));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function assertFinished(r: FaultRun): void {
  assert.equal(r.code, 0, r.output);
  const lines = metricsOf(r.runDir);
  assert.equal(lines.at(-1)!.step, STEPS);
  assert.ok(lines.at(-1)!.mse < lines[0]!.mse * 0.8, `the loss falls: mse ${lines[0]!.mse} -> ${lines.at(-1)!.mse}`);
  const [ledger] = r.ledger;
  assert.ok(ledger?.producedReconciles && ledger.acceptedReconciles, JSON.stringify(r.ledger));
  assert.deepEqual(ledger.lost, { lost_with_buffer: 0, left_at_stop: 0 });
}

describe("coordination faults mid-run", { timeout: 600_000 }, () => {
  it("kill -9 of nats-server: restarted on its port; every role reconnects and the run goes on", async () => {
    const r = await faultRun("nats", { at: 600, inject: async (run) => void process.kill(run.natsPid!, "SIGKILL") });
    runs.push(r);
    assertFinished(r);
    assert.match(r.output, /saeflow: nats-server exited with signal SIGKILL; restarting it on port \d+ \(restart 1 of 3\)/);
    const serving = r.events.find((e) => e.who === "nats-server" && e.event === "serving");
    assert.ok(serving, r.output);
    const reconnects: string[] = [];
    for (const role of ["buffer", "producer-0", "trainer-0"]) {
      const log = readFileSync(join(r.runDir, "logs", `${role}.log`), "utf8");
      assert.match(log, /nats: lost the connection to nats:\/\/127\.0\.0\.1:\d+; reconnecting/, role);
      const back = /nats: reconnected to nats:\/\/127\.0\.0\.1:\d+ after (\d+) ms/.exec(log);
      assert.ok(back, `${role} reconnected:\n${log}`);
      reconnects.push(`${role} ${back[1]} ms`);
    }
    figure(
      `kill -9 nats-server at step ${r.stepAtFault}: serving again after ${serving.seconds!.toFixed(2)} s; reconnected ${reconnects.join(", ")}; ` +
        `training moved again after ${r.trainingMovedAfterS?.toFixed(1)} s`,
    );
  });

  it("SIGSTOP of a producer for 6 s (past the 3 s lapse) and SIGCONT: it lapses, comes back, and the run finishes", async () => {
    let thawedAt = 0;
    const r = await faultRun("freeze", {
      at: 600,
      inject: async (run) => {
        const pid = pidOf(run, "producer-0");
        process.kill(pid, "SIGSTOP");
        await sleep(6000);
        process.kill(pid, "SIGCONT");
        thawedAt = Date.now();
      },
    });
    runs.push(r);
    assertFinished(r);
    assert.deepEqual(
      r.events.filter((e) => e.who === "producer-0"),
      [],
      "a frozen producer is not restarted",
    );
    const buffer = readFileSync(join(r.runDir, "logs", "buffer.log"), "utf8");
    assert.match(buffer, /producer-0 lapsed: no heartbeat for 3 s; its unused credit goes to the others/);
    assert.match(buffer, /producer-0 is back \(heartbeat after \d+\.\d s\); it gets grants again/);
    const down = r.pipeline.filter((p) => p.t > r.faultAt && p.down?.includes("producer-0 (not answering)"));
    assert.ok(down.length > 0, "the progress line said the producer did not answer");
    const atThaw = r.pipeline.filter((p) => p.t <= thawedAt).at(-1)!.step;
    const moved = movedAfter(r.pipeline, thawedAt, atThaw);
    figure(
      `SIGSTOP producer-0 for 6 s at step ${r.stepAtFault}: training moved again ${moved?.toFixed(1)} s after the SIGCONT (at step ${atThaw})`,
    );
  });
});
