import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { StatusResponseSchema as BufferStatus } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { StatusResponseSchema as TrainerStatus } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { RecentWindow, summarise } from "../../tools/cli/progress.js";
import type { RunStatus } from "../../tools/cli/status.js";
import { explainStall, Watchdog } from "../../tools/cli/watchdog.js";

// The progress line of `saeflow up` never shows stale figures: throughput and trainer wait are those
// of the last seconds, what is down is named, and a stall is explained by the watchdog.
const HOOK = "blocks.1.hook_resid_post";

/** One poll at `t` ms: the trainer at `tokens` having waited `waitMs`, or not answering; the buffer at `fill`. */
function poll(t: number, trainer: { tokens: number; waitMs: number } | undefined, fill = 0.5): RunStatus {
  return {
    at: t,
    buffer: [
      {
        id: "buffer",
        status: create(BufferStatus, {
          state: ServiceState.RUNNING,
          producers: [],
          hookPoints: [{ hookPoint: HOOK, fillFraction: fill, refilling: true }],
        }),
      },
    ],
    producers: [{ id: "producer-0", error: "UNAVAILABLE" }],
    trainers: [
      trainer
        ? {
            id: "trainer-0",
            status: create(TrainerStatus, {
              state: ServiceState.RUNNING,
              waitMs: trainer.waitMs,
              wallMs: t,
              saes: [
                { name: "s", step: BigInt(Math.floor(trainer.tokens / 100)), tokens: BigInt(trainer.tokens), tokensPerSecond: 99_999 },
              ],
            }),
          }
        : { id: "trainer-0", error: "UNAVAILABLE" },
    ],
  };
}

test("throughput and wait are those of the last seconds: a stall reads 0 tok/s and 100% wait, not the old figures", () => {
  const recent = new RecentWindow();
  const live = { recent, down: [] as string[], lastStep: 0 };
  let r = summarise(poll(0, { tokens: 0, waitMs: 0 }), 0, 1000, live);
  // Steady: 10k tokens a second, waiting 10% of the time.
  for (let t = 1000; t <= 6000; t += 1000) r = summarise(poll(t, { tokens: t * 10, waitMs: t / 10 }), 0, 1000, live);
  assert.equal(Math.round(r.trainerTokensPerS), 10_000, "not the trainer's own 99,999 from its last metrics window");
  assert.ok(Math.abs(r.trainerWaitFraction - 0.1) < 1e-9);
  // Then nothing moves: its counters stay where they were.
  for (let t = 7000; t <= 12_000; t += 1000) r = summarise(poll(t, { tokens: 60_000, waitMs: 600 }), 0, 1000, live);
  assert.equal(r.trainerTokensPerS, 0);
  assert.equal(r.trainerWaitFraction, 1);
  assert.equal(r.stalledS, 6);
  // A trainer that does not answer keeps its last step on the line, and counts as waiting.
  live.lastStep = 600;
  r = summarise(poll(13_000, undefined), 0, 1000, live);
  assert.equal(r.step, 600);
  assert.equal(r.trainerWaitFraction, 1);
});

test("the watchdog says who waits for what once no step was taken for watchdogMs, and again as often while it lasts", () => {
  const said: string[] = [];
  const dog = new Watchdog(30_000, 0.25, (l) => said.push(l));
  const st = poll(0, { tokens: 1, waitMs: 0 }, 0.12);
  dog.check(st, 29, []);
  assert.deepEqual(said, []);
  dog.check({ ...st, at: 1000 }, 31, ["nats-server (restarting)"]);
  dog.check({ ...st, at: 2000 }, 32, ["nats-server (restarting)"]);
  dog.check({ ...st, at: 31_000 }, 61, ["nats-server (restarting)"]);
  assert.equal(said.length, 2);
  assert.equal(
    said[0],
    "no trainer step for 31 s: down: nats-server (restarting); trainer-0 is running, waiting for batches; " +
      `buffer is running: ${HOOK} holds 12% (batches are drawn above 25%), asking producers to refill, 0 producer(s) heard over NATS; ` +
      "producer-0 does not answer (UNAVAILABLE)",
  );
  assert.match(explainStall(poll(0, undefined), [], 0.25), /trainer-0 does not answer \(UNAVAILABLE\)/);
});
