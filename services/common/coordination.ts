import { z } from "zod";
import type { Bus } from "./nats.js";

/**
 * The NATS contract between buffer and producers (documented in the README). NATS carries control
 * only; tensors travel over gRPC. Every subject starts with `<prefix>.<runId>.`; those between a
 * buffer shard and its producers continue with `shard.<i>.` (i = buffer.shard, 0 in a one-buffer run).
 *
 *   <p>.<run>.shard.<i>.members.join       producer → all     MemberAnnounce   a producer joins the shard
 *   <p>.<run>.shard.<i>.members.leave      producer → all     MemberAnnounce   a producer leaves cleanly
 *   <p>.<run>.shard.<i>.members.heartbeat  producer → all     MemberAnnounce   every heartbeatMs; 3 missed = gone
 *   <p>.<run>.shard.<i>.buffer.demand      buffer → producers Demand           refill grants or pause, on change and every heartbeat
 *   <p>.<run>.shard.<i>.buffer.hello       producer → buffer  request MemberAnnounce, reply Demand (join without waiting)
 *   <p>.<run>.run.state                    any → all          RunState         draining / stopped (of one shard, or the whole run)
 *   <p>.<run>.trainers.done                trainer → buffers  TrainerDone      a trainer finished hook points (a pool is done once all reading it are)
 */
export const HEARTBEAT_MS = 1000;
export const MEMBER_TIMEOUT_MS = 3 * HEARTBEAT_MS;

export function subjects(prefix: string, runId: string, shard = 0) {
  const base = `${prefix}.${runId}`;
  // Membership and grants are per buffer shard: a producer is a member of each shard it pushes to.
  const own = `${base}.shard.${shard}`;
  return {
    join: `${own}.members.join`,
    leave: `${own}.members.leave`,
    heartbeat: `${own}.members.heartbeat`,
    demand: `${own}.buffer.demand`,
    hello: `${own}.buffer.hello`,
    runState: `${base}.run.state`,
    trainerDone: `${base}.trainers.done`,
  } as const;
}
export type Subjects = ReturnType<typeof subjects>;

/**
 * How far a producer's contexts of one hook point have gone, as next context ids: every context
 * below `sent` was written to a Push stream, every context below `answered` was answered by a buffer.
 */
export const HookMarks = z.object({
  sent: z.number().int().min(0),
  answered: z.number().int().min(0),
});
export type HookMarks = z.infer<typeof HookMarks>;

/** Who a producer is and what it feeds. */
export const MemberAnnounce = z.object({
  producerId: z.string().min(1),
  hookPoints: z.array(z.string().min(1)),
  /** gRPC control address of the producer (for `saeflow status`). */
  address: z.string(),
  /** Rows per hook point the producer sends per chunk, so grants can be sized in whole chunks. */
  chunkRows: z.number().int().positive(),
  /**
   * Most rows per hook point one context makes: a pass takes whole contexts, so credit under this
   * cannot be spent (see the buffer's stranded pools). Without it, chunkRows.
   */
  contextRows: z.number().int().positive().optional(),
  /**
   * Which pass through its shard the producer's context ids count in: made when it starts the shard
   * afresh, kept (in its position file) across restarts that resume. A context id names the same rows
   * within one lineage only.
   */
  lineage: z.string().optional(),
  /**
   * Per hook point, how far its contexts have gone. A buffer that restarted without its state file
   * learns from `answered` which re-sent rows it must not accept again.
   */
  marks: z.record(z.string(), HookMarks).optional(),
  /**
   * Rows per hook point sent to the shard since the producer last joined it, given only while every
   * one of them was answered (nothing in flight or on its way): the buffer has then received them all,
   * whatever order the hello, the re-sent rows and this heartbeat reached it in, so it counts at least
   * these against the grant. Without it a re-sent chunk that reached a restarted buffer before the
   * producer was a member there would hold a promise of rows that never come.
   */
  settled: z.number().int().min(0).optional(),
});
export type MemberAnnounce = z.infer<typeof MemberAnnounce>;

/**
 * The buffer's word to producers. `command` is "refill" from the low watermark until the pools are
 * full, then "pause". `grants[producerId]` is the cumulative number of rows (per hook point, since
 * the producer joined the run) it may have sent in total: the rows the buffer accepted from it plus
 * its share of the free rows. Being absolute, a grant is safe to repeat or reorder, rows in flight
 * count against it, and producers together never overshoot the pools by more than a chunk each.
 */
export const Demand = z.object({
  /**
   * Refill cycles begun so far, summed over the buffer's hook points: a pool begins one each time it
   * falls to its low watermark, and its first fill (from empty) is its cycle 1 (docs/nats.md).
   */
  cycle: z.number().int().min(0),
  command: z.enum(["refill", "pause"]),
  grants: z.record(z.string(), z.number().int().min(0)),
  /** Free rows per hook point at the time of sending. */
  freeRows: z.record(z.string(), z.number().int().min(0)),
  /**
   * Pools of the shard whose trainers are all done: they take no more rows. A producer that feeds
   * the shard only such pools leaves it, so that its other shards are not held back by a grant that
   * will never come.
   */
  done: z.array(z.string()).default([]),
  /**
   * Other buffer shards this one heard drain or stop (their RunState): a producer that was down when
   * one of them ended, and so never heard it, learns here not to wait for its grant.
   */
  endedShards: z.array(z.number().int().min(0)).default([]),
});
export type Demand = z.infer<typeof Demand>;

/**
 * The run's state. With `shard`, it is one buffer shard's part of the run that drains or stops (its
 * trainers are done, or an operator drained that buffer): its producers stop feeding it and leave it,
 * and go on feeding the other shards. Without, it is the whole run.
 */
export const RunState = z.object({
  state: z.enum(["running", "draining", "stopped"]),
  reason: z.string().default(""),
  shard: z.number().int().min(0).optional(),
});
export type RunState = z.infer<typeof RunState>;

/**
 * A trainer is done with hook points (their steps done, or stopped by an operator): it will pull no
 * more batches of them. A trainer process of several hook points sends one per hook point, as each
 * one's training ends, so that its pools stop waiting for it while it trains the others. Not sent
 * when a trainer is stopped by a signal, since it will be started again and resume.
 */
export const TrainerDone = z.object({
  trainerId: z.string().min(1),
  /** The hook points it is done with: each buffer shard holding one of them counts it for that pool. */
  hookPoints: z.array(z.string()),
  /** The step it finished at. */
  step: z.number().int().min(0),
});
export type TrainerDone = z.infer<typeof TrainerDone>;

/** How long a trainer keeps trying to get its TrainerDone to the NATS server before it gives up. */
const ANNOUNCE_MS = 30_000;
const RECONNECT_MS = 2000;

/** A trainer's way to say it is done: its own NATS connection, made in the background so NATS is never on its start-up path. */
export interface DoneAnnouncer {
  /** Publishes `done` and waits until the server has it; false (and a line saying so) when it could not within 30 s. */
  announce(done: TrainerDone): Promise<boolean>;
  /** Lets go of the connection. */
  close(): Promise<void>;
}

/**
 * Connects (again and again, until it works or is closed) with `connect`, so that a trainer started
 * while NATS is down can still announce its end once NATS is back.
 */
export function doneAnnouncer(connect: () => Promise<Bus>, subject: string, log: (line: string) => void): DoneAnnouncer {
  let closed = false;
  let bus: Bus | undefined;
  let said = false;
  void (async () => {
    while (!closed) {
      try {
        bus = await connect();
        if (closed) await bus.drain();
        return;
      } catch (err) {
        if (!said) log(`nats: not connected yet (${(err as Error).message}); retrying, the run's end is announced over it`);
        said = true;
        await new Promise((r) => setTimeout(r, RECONNECT_MS).unref());
      }
    }
  })();
  return {
    announce: async (done) => {
      const until = Date.now() + ANNOUNCE_MS;
      // A connection that never came up will not now: NATS is not there for this trainer at all.
      if (!bus) log(`nats: never connected, so ${done.trainerId} cannot say it is done; the buffer will not end the run by itself`);
      while (bus && Date.now() < until) {
        bus.publish(subject, TrainerDone, done);
        const left = new Promise<boolean>((r) => setTimeout(() => r(false), Math.max(0, until - Date.now())).unref());
        if (await Promise.race([bus.flush(), left])) return true;
        await new Promise((r) => setTimeout(r, 500));
      }
      log(
        `nats: could not announce that ${done.trainerId} is done within ${ANNOUNCE_MS / 1000} s; the buffer will not end the run by itself`,
      );
      return false;
    },
    close: async () => {
      // An attempt under way drains what it gets by itself; nothing here waits for it.
      closed = true;
      await bus?.drain();
    },
  };
}
