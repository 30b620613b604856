import type { Subscription } from "@nats-io/transport-node";
import { type Subjects, TrainerDone } from "../common/coordination.js";
import type { Bus } from "../common/nats.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { Consumers } from "./consumers.js";

/** How long the buffer waits for its producers to answer the end of the run and leave. */
const PRODUCERS_LEAVE_MS = 15_000;

export interface RunEndOptions {
  bus: Bus;
  subjects: Subjects;
  buffer: ActivationBuffer;
  consumers: Consumers;
  /** buffer.trainers: how many must be done; 0 leaves the run's end to a Drain. */
  expected: number;
  /** Live producers (NATS members). */
  producers: () => string[];
  log: (line: string) => void;
}

/**
 * Ends the run when its trainers are done, so that a run (a set of Kubernetes Jobs, or `saeflow up`)
 * finishes by itself: each trainer announces on `trainers.done`; once buffer.trainers have, the buffer takes no
 * more rows (RunState draining: producers stop, answer what is in flight and leave), waits for its
 * producers to leave, and stops (RunState stopped). Rows still held then stay in the ledger as held.
 */
export class RunEnd {
  private readonly done = new Map<string, number>();
  private subscription: Subscription | undefined;
  private ending = false;

  constructor(private readonly options: RunEndOptions) {}

  start(): void {
    this.subscription = this.options.bus.subscribe(this.options.subjects.trainerDone, TrainerDone, (m) => this.trainerDone(m));
  }

  close(): void {
    this.subscription?.unsubscribe();
  }

  private trainerDone(m: TrainerDone): void {
    const { consumers, expected, log } = this.options;
    if (this.done.has(m.trainerId)) return;
    this.done.set(m.trainerId, m.step);
    consumers.done(m.trainerId);
    if (expected === 0) return log(`${m.trainerId} is done at step ${m.step}; buffer.trainers is 0, so the run ends on a Drain`);
    const waiting = expected - this.done.size;
    log(
      `${m.trainerId} is done at step ${m.step}; ${waiting > 0 ? `${waiting} of buffer.trainers = ${expected} still training` : "every trainer is done"}`,
    );
    if (waiting <= 0) void this.end();
  }

  private async end(): Promise<void> {
    const { buffer, producers, log } = this.options;
    const stopped = () => buffer.state === ServiceState.STOPPED;
    if (this.ending || stopped()) return;
    this.ending = true;
    buffer.endRun();
    const until = Date.now() + PRODUCERS_LEAVE_MS;
    while (producers().length > 0 && Date.now() < until && !stopped()) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const left = producers();
    if (left.length) log(`producers ${left.join(", ")} did not leave within ${PRODUCERS_LEAVE_MS / 1000} s; stopping anyway`);
    buffer.close("run_ended");
  }
}
