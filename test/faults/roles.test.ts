import assert from "node:assert/strict";
import { copyFileSync, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, describe, it } from "node:test";
import { readSafetensors } from "../../services/common/safetensors.js";
import { checkpointPath, checkpointSteps } from "../../services/trainer/checkpoint.js";
import { BATCH, type FaultRun, faultRun, figure, metricsOf, pidOf, removeRun, SAE, STEPS } from "./support.js";

// kill -9 of each role once, mid-run, through `saeflow up`: the CLI restarts it, it resumes, and the
// run ends by itself with exit 0, a falling loss and a ledger that reconciles.
const runs: FaultRun[] = [];
after(() => runs.forEach(removeRun));

/** What every faulted run must show, whatever the fault. */
function assertRunSurvived(r: FaultRun, who: string): void {
  assert.equal(r.code, 0, r.output);
  const restarted = r.events.filter((e) => e.who === who);
  assert.deepEqual(
    restarted.map((e) => e.event),
    ["exited", "restarted", "serving"],
    `one restart of ${who}:\n${r.output}`,
  );
  assert.match(
    r.output,
    new RegExp(`saeflow: ${who} exited with signal SIGKILL \\(log: .*${who}\\.log\\); restarting it \\(restart 1 of 3\\)`),
  );
  const lines = metricsOf(r.runDir);
  assert.equal(lines.at(-1)!.step, STEPS);
  assert.ok(lines.at(-1)!.mse < lines[0]!.mse * 0.8, `the loss falls: mse ${lines[0]!.mse} -> ${lines.at(-1)!.mse}`);
  const [ledger] = r.ledger;
  assert.ok(ledger && ledger.produced > 0 && ledger.served >= STEPS * BATCH, JSON.stringify(r.ledger));
  assert.ok(ledger.producedReconciles, `produced = accepted + refused: ${JSON.stringify(ledger)}`);
  assert.ok(ledger.acceptedReconciles, `accepted = served + held + lost: ${JSON.stringify(ledger)}`);
  const serving = restarted.find((e) => e.event === "serving")!;
  figure(
    `kill -9 ${who} at step ${r.stepAtFault}: serving again after ${serving.seconds!.toFixed(1)} s, training moved again after ${r.trainingMovedAfterS?.toFixed(1)} s; ` +
      `refused ${JSON.stringify(ledger.refused)}, lost ${JSON.stringify(ledger.lost)}`,
  );
}

describe("kill -9 of a role mid-run", { timeout: 600_000 }, () => {
  it("a producer: restarted from its saved position; what it makes again is refused as duplicates, never accepted twice", async () => {
    const r = await faultRun("producer", { at: 600, inject: async (run) => void process.kill(pidOf(run, "producer-0"), "SIGKILL") });
    runs.push(r);
    assertRunSurvived(r, "producer-0");
    const log = readFileSync(join(r.runDir, "logs", "producer-0.log"), "utf8");
    assert.match(log, /producer-0: resuming at file \d+ byte \d+/);
    assert.equal(r.ledger[0]!.lost.lost_with_buffer, 0, "the buffer lost nothing");
  });

  it("the buffer: restarted from its state file; the rows its pool held are counted lost_with_buffer, re-sent chunks are not accepted twice", async () => {
    const r = await faultRun("buffer", {
      at: 600,
      // As `npm start` does: evaluate and report once the run is over.
      sets: ["launch.evaluate=true", "launch.evalContexts=2", "launch.report=true"],
      inject: async (run) => void process.kill(pidOf(run, "buffer"), "SIGKILL"),
    });
    runs.push(r);
    assertRunSurvived(r, "buffer");
    const buffer = readFileSync(join(r.runDir, "logs", "buffer.log"), "utf8");
    assert.match(buffer, /went on from the ledger in .*buffer\.state\.json: \d+ rows accepted so far, \d+ lost with earlier buffers/);
    const trainer = readFileSync(join(r.runDir, "logs", "trainer-0.log"), "utf8");
    assert.match(trainer, /stream of \S+ from the buffer at \S+ lost .*; reconnecting for up to 60 s/);
    const back = /stream of \S+ from the buffer at \S+ back after (\d+) ms; training goes on/.exec(trainer);
    assert.ok(back, trainer);
    const pushBack = /push: stream to \S+ is back after (\d+) ms/.exec(readFileSync(join(r.runDir, "logs", "producer-0.log"), "utf8"));
    assert.ok(pushBack, "the producer's push stream came back");
    figure(`kill -9 buffer: the trainer's stream was back after ${back[1]} ms, the producer's push stream after ${pushBack[1]} ms`);
    assert.doesNotMatch(trainer, /resumed/, "the trainer rode through: it was not restarted");
    assert.ok(r.ledger[0]!.lost.lost_with_buffer! > 0, `a pool that held rows lost them: ${JSON.stringify(r.ledger[0])}`);
    const evaluated = JSON.parse(readFileSync(join(r.runDir, "eval.json"), "utf8")) as Array<{ sae: string; lm_loss_sae: number }>;
    assert.deepEqual(
      evaluated.map((e) => e.sae),
      [SAE],
    );
    assert.ok(Number.isFinite(evaluated[0]!.lm_loss_sae));
    const report = readFileSync(join(r.runDir, "report.html"), "utf8");
    assert.match(report, /<h2>Rows ledger per hook point/);
    assert.match(report, /<h2>Faults and restarts<\/h2>.*<td>buffer<\/td><td>exited<\/td>/s);
  });

  it("the trainer: restarted from its newest checkpoint, weights, Adam moments, RNG and step as saved", async () => {
    const kept = { step: -1, copy: "" };
    const r = await faultRun("trainer", {
      at: 650,
      inject: async (run, runDir) => {
        const dir = join(runDir, SAE, "checkpoints");
        process.kill(pidOf(run, "trainer-0"), "SIGKILL");
        // The newest checkpoint at the moment of death, as it was then.
        kept.step = checkpointSteps(dir).at(-1)!;
        kept.copy = join(runDir, "..", "kept.safetensors");
        copyFileSync(checkpointPath(dir, kept.step), kept.copy);
      },
    });
    runs.push(r);
    assertRunSurvived(r, "trainer-0");
    assert.ok(kept.step >= 400, `checkpoint ${kept.step}, fault at step ${r.stepAtFault}`);
    const log = readFileSync(join(r.runDir, "logs", "trainer-0.log"), "utf8");
    assert.match(log, new RegExp(`resumed 1 SAE\\(s\\) at step ${kept.step} from `));
    figure(`kill -9 trainer-0: resumed at its checkpoint of step ${kept.step}`);
    // The checkpoint it resumed from holds the whole state, and the restarted trainer did not rewrite it.
    const saved = readSafetensors(kept.copy);
    for (const name of ["W_enc", "b_enc", "W_dec", "b_dec", "m_W_enc", "v_W_enc", "m_W_dec", "v_W_dec"])
      assert.ok(saved.tensors[name], name);
    const meta = JSON.parse(saved.metadata.saeflow!) as { step: number; tokens: number; rng: unknown };
    assert.deepEqual([meta.step, meta.tokens], [kept.step, kept.step * BATCH]);
    assert.ok(meta.rng, "the RNG state is in the checkpoint");
    const file = checkpointPath(join(r.runDir, SAE, "checkpoints"), kept.step);
    assert.ok(existsSync(file) && readFileSync(file).equals(readFileSync(kept.copy)));
    // Its counters go on from the checkpoint: every window after the restart is at its step's tokens.
    const lines = metricsOf(r.runDir);
    assert.ok(lines.every((l) => l.tokens === l.step * BATCH));
    // Windows logged by the dead trainer after its checkpoint are logged again: the log goes back once, to it.
    const back = lines.filter((l, i) => i > 0 && l.step <= lines[i - 1]!.step);
    assert.ok(back.length <= 1, JSON.stringify(back));
    assert.deepEqual(
      back.map((l) => l.step),
      back.length ? [kept.step + 20] : [],
    );
  });
});
