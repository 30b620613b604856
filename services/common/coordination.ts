import { z } from "zod";

/**
 * The NATS contract between buffer and producers (documented in the README). NATS carries control
 * only; tensors travel over gRPC. Every subject starts with `<prefix>.<runId>.`.
 *
 *   <p>.<run>.members.join       producer → all     MemberAnnounce   a producer joins the run
 *   <p>.<run>.members.leave      producer → all     MemberAnnounce   a producer leaves cleanly
 *   <p>.<run>.members.heartbeat  producer → all     MemberAnnounce   every heartbeatMs; 3 missed = gone
 *   <p>.<run>.buffer.demand      buffer → producers Demand           refill grants or pause, on change and every heartbeat
 *   <p>.<run>.buffer.hello       producer → buffer  request MemberAnnounce, reply Demand (join without waiting)
 *   <p>.<run>.run.state          any → all          RunState         draining / stopped
 */
export const HEARTBEAT_MS = 1000;
export const MEMBER_TIMEOUT_MS = 3 * HEARTBEAT_MS;

export function subjects(prefix: string, runId: string) {
  const base = `${prefix}.${runId}`;
  return {
    join: `${base}.members.join`,
    leave: `${base}.members.leave`,
    heartbeat: `${base}.members.heartbeat`,
    demand: `${base}.buffer.demand`,
    hello: `${base}.buffer.hello`,
    runState: `${base}.run.state`,
  } as const;
}
export type Subjects = ReturnType<typeof subjects>;

/** Who a producer is and what it feeds. */
export const MemberAnnounce = z.object({
  producerId: z.string().min(1),
  hookPoints: z.array(z.string().min(1)),
  /** gRPC control address of the producer (for `saeflow status`). */
  address: z.string(),
  /** Rows per hook point the producer sends per chunk, so grants can be sized in whole chunks. */
  chunkRows: z.number().int().positive(),
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
});
export type Demand = z.infer<typeof Demand>;

export const RunState = z.object({
  state: z.enum(["running", "draining", "stopped"]),
  reason: z.string().default(""),
});
export type RunState = z.infer<typeof RunState>;
