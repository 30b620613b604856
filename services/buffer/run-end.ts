import type { Subscription } from "@nats-io/transport-node";
import { type Subjects, TrainerDone } from "../common/coordination.js";
import type { Bus } from "../common/nats.js";
import { trainerHookPoints } from "../common/shards.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { ActivationBuffer } from "./activation-buffer.js";
import type { HookPoint } from "./hook-point.js";
import type { Consumers } from "./consumers.js";

/** How long the buffer waits for its producers to answer the end of the run and leave. */
const PRODUCERS_LEAVE_MS = 15_000;

export interface RunEndOptions {
  bus: Bus;
  subjects: Subjects;
  buffer: ActivationBuffer;
  consumers: Consumers;
  /**
   * buffer.trainers: the run's trainer processes; 0 leaves the run's end to a Drain. Each pool waits
   * for those of them that train its hook point (see readersOf).
   */
  expected: number;
  /** trainer.hookPoints, split over the trainer processes as trainerHookPoints does. */
  trainerHookPoints: readonly string[];
  /** Live producers (NATS members). */
  producers: () => string[];
  log: (line: string) => void;
}

/**
 * How many of the run's `count` trainer processes read from a shard holding `held`: those whose hook
 * points (trainerHookPoints) include one of them.
 */
export function readersOf(trainerHooks: readonly string[], count: number, held: readonly string[]): number {
  let readers = 0;
  for (let i = 0; i < count; i++)
    if (trainerHookPoints({ hookPoints: [...trainerHooks] }, i, count).some((h) => held.includes(h))) readers++;
  return readers;
}

/**
 * Ends the shard's part of the run when the trainers reading from it are done, so that a run (a set
 * of Kubernetes Jobs, or `saeflow up`) finishes by itself. Trainers announce on `trainers.done`
 * (run-wide) each hook point they are done with. A pool is done once every one of buffer.trainers
 * that trains its hook point (readersOf) has announced it: it stops asking for rows (its shard's
 * grants and pause ignore it), and rows pushed to it are refused at once as `draining`, so that a
 * full pool nobody reads no longer holds back the producers, whose passes feed the other pools too;
 * the rows it holds stay held. A pool no trainer reads is done from the start. Once every pool is
 * done, the shard takes no more rows (RunState draining of this shard: its producers stop feeding
 * it, answer what is in flight and leave it), waits for its producers to leave, and stops (RunState
 * stopped). Rows still held then stay in the ledger as held. Other shards go on until their own
 * pools are done. Who is done with which pool is kept in buffer.stateFile, so a restarted shard
 * does not wait again for trainers that are gone.
 */
export class RunEnd {
  private subscription: Subscription | undefined;
  private ending = false;
  /** Per pool, the trainer processes (of the expected ones) that read it. */
  private readonly readers = new Map<HookPoint, number>();

  constructor(private readonly options: RunEndOptions) {
    for (const hook of options.buffer.hooks.values()) {
      this.readers.set(hook, readersOf(options.trainerHookPoints, options.expected, [hook.name]));
    }
  }

  start(): void {
    const { bus, subjects, expected, log } = this.options;
    this.subscription = bus.subscribe(subjects.trainerDone, TrainerDone, (m) => this.trainerDone(m));
    if (expected === 0) return;
    const unread = [...this.readers].filter(([, n]) => n === 0).map(([h]) => h.name);
    if (unread.length) log(`no trainer of buffer.trainers = ${expected} reads ${unread.join(", ")}: it takes no rows`);
    for (const hook of this.readers.keys()) this.settle(hook);
    this.endWhenDone();
  }

  close(): void {
    this.subscription?.unsubscribe();
  }

  private trainerDone(m: TrainerDone): void {
    const { buffer, consumers, expected, log } = this.options;
    const mine = m.hookPoints.flatMap((h) => buffer.hooks.get(h) ?? []).filter((h) => !h.doneReaders.has(m.trainerId));
    // A trainer of other hook points only is another shard's reader; one said twice is counted once.
    if (mine.length === 0) return;
    consumers.done(
      m.trainerId,
      mine.map((h) => h.name),
    );
    for (const hook of mine) hook.doneReaders.add(m.trainerId);
    buffer.commit();
    if (expected === 0) return log(`${m.trainerId} is done at step ${m.step}; buffer.trainers is 0, so the run ends on a Drain`);
    for (const hook of mine) {
      const waiting = this.readers.get(hook)! - hook.doneReaders.size;
      log(
        `${m.trainerId} is done with ${hook.name} at step ${m.step}; ${waiting > 0 ? `${waiting} of its ${this.readers.get(hook)} trainers still training` : "every trainer reading it is done: it takes no more rows"}`,
      );
      this.settle(hook);
    }
    this.endWhenDone();
  }

  /** Marks `hook` done once every trainer reading it announced it. */
  private settle(hook: HookPoint): void {
    if (hook.doneReaders.size >= this.readers.get(hook)!) hook.finishReaders();
  }

  /** Ends the shard once every pool is done (and some trainer read one: a shard nobody reads is left to a Drain). */
  private endWhenDone(): void {
    const pools = [...this.readers];
    if (pools.every(([h]) => h.readersDone) && pools.some(([, n]) => n > 0)) void this.end();
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
    // Stopped meanwhile (stop()): it has said its last word and saved its ledger.
    if (stopped()) return;
    const left = producers();
    if (left.length) log(`producers ${left.join(", ")} did not leave within ${PRODUCERS_LEAVE_MS / 1000} s; stopping anyway`);
    buffer.close("run_ended");
  }
}
