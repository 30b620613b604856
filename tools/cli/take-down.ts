import { furthestStep } from "./control.js";
import { finalStatus, writeFinalStatus } from "./final-status.js";
import { ledgerLines } from "./ledger.js";
import { limit, type LocalRun, log } from "./local-run.js";
import { stopRole } from "./processes.js";
import type { Slot } from "./supervise.js";

/** How long the buffer and producers get to end by themselves once every trainer is done. */
const END_BY_ITSELF_MS = 30_000;

/**
 * Ends the run. When its trainers are done, the run ends by itself (they announce it, the buffer stops
 * the producers and ends); what is still running after END_BY_ITSELF_MS, or at once after a failure
 * or Ctrl-C, is stopped (SIGTERM) in the order producers, trainers, buffer, so that every chunk in
 * flight is answered before the buffer goes. Then final-status.json is made of the status each role
 * wrote as it exited, with the row ledger, and the nats-server is stopped.
 */
export async function takeDown(run: LocalRun, completed: boolean): Promise<void> {
  const { plan, sup } = run;
  const running = () => sup.slots.filter((s) => s.state === "running" || s.state === "restarting");
  if (completed && running().length) {
    await Promise.race([Promise.all(running().map((s) => s.done)), limit(END_BY_ITSELF_MS)]);
    const left = running().map((s) => s.spec.id);
    if (left.length) log(`${left.join(", ")} did not end by themselves ${END_BY_ITSELF_MS / 1000} s after the trainers; stopping them`);
  }
  sup.ending = true;
  for (const role of ["producer", "trainer", "buffer"] as const) {
    await Promise.all(sup.of(role).map((s) => stop(s)));
  }
  try {
    const st = await finalStatus(
      sup.slots.map((s) => s.proc),
      plan.cli,
    );
    run.step = Math.max(run.step, furthestStep(st));
    for (const line of ledgerLines(writeFinalStatus(plan.runDir, st))) log(`rows ${line}`);
  } catch (err) {
    log(`final-status.json not written: ${(err as Error).message}`);
  }
  await run.nats?.stop();
}

async function stop(slot: Slot): Promise<number> {
  if (slot.state === "running") await stopRole(slot.proc, 15_000);
  return slot.done;
}
