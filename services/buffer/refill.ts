import type { Subscription } from "@nats-io/transport-node";
import { Demand, HEARTBEAT_MS, MEMBER_TIMEOUT_MS, MemberAnnounce, RunState, type Subjects, subjects } from "../common/coordination.js";
import type { Bus } from "../common/nats.js";
import { shardsOf } from "../common/shards.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { ActivationBuffer, BufferObserver } from "./activation-buffer.js";
import type { HookPoint } from "./hook-point.js";

/** A producer of the run, as the buffer sees it. */
interface Member {
  announce: MemberAnnounce;
  lastSeen: number;
  /** False once its heartbeats stopped: it gets no grants and is not in Demand until one comes back. */
  live: boolean;
  /** Cumulative rows per hook point it may have sent since it joined; never decreases. */
  grant: number;
  /** Rows received from it per hook point since it joined (duplicates excluded). */
  received: Map<string, number>;
}

export interface RefillOptions {
  bus: Bus;
  /** First token of every subject (nats.subjectPrefix). */
  prefix: string;
  buffer: ActivationBuffer;
  /** Membership lines: a producer lapsed, or came back. */
  log?: (line: string) => void;
}

/**
 * The buffer's side of the NATS handshake (docs/nats.md): producer membership, and Demand with
 * absolute grants. Grants only grow, and only by whole chunks of free rows not already promised:
 * for each hook point, free rows minus every member's outstanding credit (grant minus received).
 * So producers that send only within their credit never overshoot a pool, whatever the order or
 * repetition of Demand messages.
 */
export class RefillCoordinator implements BufferObserver {
  private readonly members = new Map<string, Member>();
  private readonly subjects: Subjects;
  private readonly subscriptions: Subscription[] = [];
  private timer: NodeJS.Timeout | undefined;
  private scheduled = false;
  private closed = false;
  private lastPublished = "";
  private readonly bus: Bus;
  private readonly buffer: ActivationBuffer;
  private readonly log: (line: string) => void;
  private readonly shardCount: number;

  constructor(options: RefillOptions) {
    this.bus = options.bus;
    this.buffer = options.buffer;
    this.log = options.log ?? (() => undefined);
    this.shardCount = shardsOf(options.buffer.config).length;
    this.subjects = subjects(options.prefix, options.buffer.runId, options.buffer.shard.index);
  }

  /** Subscribes, answers hello, and sends Demand now and every heartbeat. */
  start(): void {
    const { bus, subjects: s } = this;
    this.subscriptions.push(
      bus.subscribe(s.join, MemberAnnounce, (m) => {
        if (!this.members.get(m.producerId)?.live) this.join(m);
      }),
      bus.subscribe(s.heartbeat, MemberAnnounce, (m) => this.heartbeat(m)),
      bus.subscribe(s.leave, MemberAnnounce, (m) => this.leave(m.producerId)),
      bus.subscribe(s.runState, RunState, (m) => {
        if (m.state === "running") return;
        if (m.shard === undefined || m.shard === this.buffer.shard.index) return this.buffer.drain();
        // Another shard's end is not this one's: its producers go on feeding this shard, and hear of it in Demand.
        if (this.buffer.otherShardEnded(m.shard)) this.changed();
      }),
      bus.reply(s.hello, MemberAnnounce, Demand, (m) => {
        this.join(m);
        this.grant();
        return this.demand();
      }),
    );
    this.buffer.setObserver(this);
    this.timer = setInterval(() => this.tick(), HEARTBEAT_MS);
    this.flush(true);
  }

  /** Stops answering and publishing; the bus stays open for its owner to close. */
  close(): void {
    this.closed = true;
    clearInterval(this.timer);
    this.buffer.setObserver(undefined);
    for (const sub of this.subscriptions.splice(0)) sub.unsubscribe();
  }

  /** Live producers, for Status. */
  producers(): string[] {
    return [...this.live()].map((m) => m.announce.producerId);
  }

  changed(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    // Rows move in and out thousands of times a second; one Demand per event-loop turn is enough.
    setImmediate(() => {
      this.scheduled = false;
      this.flush(false);
    });
  }

  received(producerId: string, hookPoint: string, rows: number): void {
    const member = this.members.get(producerId);
    if (member) member.received.set(hookPoint, (member.received.get(hookPoint) ?? 0) + rows);
    // Duplicates fill no slot, so nothing else would grant the credit they used up again.
    this.changed();
  }

  stateChanged(state: ServiceState, previous: ServiceState): void {
    const ending = this.buffer.endingRun;
    // Said of this shard only: the others' trainers may still be training.
    const shard = this.buffer.shard.index;
    const sharded = this.shardCount > 1;
    const done = sharded ? `every trainer reading buffer shard ${shard} is done` : "every trainer is done";
    const who = sharded ? `buffer shard ${shard}` : "buffer";
    if (state === ServiceState.DRAINING) {
      this.bus.publish(this.subjects.runState, RunState, { state: "draining", reason: ending ? done : `${who} drain`, shard });
    }
    if (state === ServiceState.STOPPED && previous === ServiceState.DRAINING) {
      this.bus.publish(this.subjects.runState, RunState, { state: "stopped", reason: ending ? done : `${who} drained`, shard });
    }
  }

  /**
   * A hello, or a join from a producer not yet a member: its grant counts again from 0. What it sent
   * before is still known (its marks), so what it re-sends is not accepted twice.
   */
  private join(announce: MemberAnnounce): void {
    this.members.set(announce.producerId, fresh(announce));
    this.adopt(announce);
    this.membershipChanged();
  }

  /**
   * Learns a producer's lineage and, without a state file, how far its rows were answered (see
   * marks.ts). The file holds the mark of every row this shard answered; a producer's word can only
   * repeat it, or overstate it for a shard it went on without.
   */
  private adopt(announce: MemberAnnounce): void {
    const marks = this.buffer.keepsState ? {} : (announce.marks ?? {});
    const answered = Object.fromEntries(Object.entries(marks).map(([hook, m]) => [hook, m.answered]));
    this.buffer.marks.adopt(announce.producerId, announce.lineage, answered);
  }

  /**
   * Heartbeats keep members live. One from a stranger makes it a member: it started before the
   * buffer, or the buffer restarted; either way this buffer has received nothing from it. One from
   * a lapsed member revives it with its counts.
   */
  private heartbeat(announce: MemberAnnounce): void {
    this.adopt(announce);
    const member = this.members.get(announce.producerId);
    if (!member) {
      const stranger = fresh(announce);
      this.members.set(announce.producerId, stranger);
      this.settle(stranger, announce.settled);
      return this.membershipChanged();
    }
    if (this.settle(member, announce.settled)) this.changed();
    const before = member.announce;
    const revived = !member.live;
    if (revived)
      this.log(
        `${announce.producerId} is back (heartbeat after ${((Date.now() - member.lastSeen) / 1000).toFixed(1)} s); it gets grants again`,
      );
    member.announce = announce;
    member.lastSeen = Date.now();
    member.live = true;
    if (revived || before.chunkRows !== announce.chunkRows || before.hookPoints.join("\n") !== announce.hookPoints.join("\n"))
      this.membershipChanged();
  }

  /**
   * A producer with nothing in flight says how many rows it sent since it joined (MemberAnnounce.settled):
   * every one of them was received, so none of its credit below that is still to come. True when that
   * raised what the buffer counted.
   */
  private settle(member: Member, settled: number | undefined): boolean {
    if (settled === undefined) return false;
    let raised = false;
    for (const hook of member.announce.hookPoints) {
      if ((member.received.get(hook) ?? 0) >= settled) continue;
      member.received.set(hook, settled);
      raised = true;
    }
    return raised;
  }

  private leave(producerId: string): void {
    if (this.members.delete(producerId)) this.membershipChanged();
  }

  /**
   * Members silent for MEMBER_TIMEOUT_MS lapse. Their unused credit is taken back (grant down to
   * what arrived), so the rows it promised can be granted to the others.
   */
  private tick(): void {
    const cutoff = Date.now() - MEMBER_TIMEOUT_MS;
    let lapsed = false;
    for (const member of this.members.values()) {
      if (member.live && member.lastSeen < cutoff) {
        member.live = false;
        member.grant = Math.max(0, ...member.received.values());
        lapsed = true;
        this.log(
          `${member.announce.producerId} lapsed: no heartbeat for ${MEMBER_TIMEOUT_MS / 1000} s; its unused credit goes to the others`,
        );
      }
    }
    if (lapsed) this.membershipChanged();
    this.flush(true);
  }

  private *live(): Iterable<Member> {
    for (const member of this.members.values()) if (member.live) yield member;
  }

  /** Pools count as full once the smallest chunk of their producers no longer fits. */
  private membershipChanged(): void {
    for (const hook of this.buffer.hooks.values()) {
      let smallest = Infinity;
      for (const m of this.live()) if (m.announce.hookPoints.includes(hook.name)) smallest = Math.min(smallest, m.announce.chunkRows);
      hook.setSmallestChunk(Number.isFinite(smallest) ? smallest : 0);
    }
    this.changed();
  }

  /** Grants new credit and publishes Demand when it differs from the last one, or always on a heartbeat. */
  private flush(always: boolean): void {
    if (this.closed) return;
    this.grant();
    this.markStranded();
    const demand = this.demand();
    const key = JSON.stringify([demand.cycle, demand.command, demand.grants, demand.done, demand.endedShards]);
    if (!always && key === this.lastPublished) return;
    this.lastPublished = key;
    this.bus.publish(this.subjects.demand, Demand, demand);
  }

  /**
   * A pool that no grant can raise and no producer's credit can add rows to is full, though more
   * than a chunk is free. Passes take whole contexts, which hold fewer rows than their bound, so a
   * producer's grant is seldom spent to the row; what is left stays promised and can keep the next
   * chunk from fitting. Counted full, the pool ends its refill (a restarted one starts serving), its
   * trainers draw it down, and grants flow again; otherwise it could stay short of full for good,
   * and in a sharded run hold back every shard its producers feed.
   */
  private markStranded(): void {
    for (const hook of this.gating()) {
      let smallest = Infinity;
      let spendable = false;
      for (const m of this.live()) {
        if (!m.announce.hookPoints.includes(hook.name)) continue;
        smallest = Math.min(smallest, m.announce.chunkRows);
        if (outstanding(m, hook.name) >= (m.announce.contextRows ?? m.announce.chunkRows)) spendable = true;
      }
      hook.setStranded(Number.isFinite(smallest) && !spendable && hook.pool.free - this.promised(hook) < smallest);
    }
  }

  /** Rows of `hook`'s pool promised and not yet arrived: every member's outstanding credit for it. */
  private promised(hook: HookPoint): number {
    let rows = 0;
    for (const m of this.members.values()) if (m.announce.hookPoints.includes(hook.name)) rows += outstanding(m, hook.name);
    return rows;
  }

  /** Pools that still ask for rows: those whose readers are all done neither refill nor pause the shard. */
  private gating(): HookPoint[] {
    return [...this.buffer.hooks.values()].filter((h) => !h.readersDone);
  }

  private demand(): Demand {
    const hooks = [...this.buffer.hooks.values()];
    const refill = this.buffer.state === ServiceState.RUNNING && this.gating().some((h) => h.refilling);
    return {
      cycle: hooks.reduce((sum, h) => sum + h.cycle, 0),
      command: refill ? "refill" : "pause",
      grants: Object.fromEntries([...this.live()].map((m) => [m.announce.producerId, m.grant])),
      freeRows: Object.fromEntries(hooks.map((h) => [h.name, h.pool.free])),
      done: hooks.filter((h) => h.readersDone).map((h) => h.name),
      endedShards: this.buffer.endedShards,
    };
  }

  /**
   * Raises grants by whole chunks into the free rows nobody has been promised. A producer qualifies
   * while one of its pools is refilling; one forward pass feeds all its hook points, so its share is
   * bounded by the fullest of them (pools whose readers are all done aside). Equal shares first, then leftover chunks to the members with the
   * least outstanding credit.
   */
  private grant(): void {
    if (this.buffer.state !== ServiceState.RUNNING) return;
    // Rows that arrived were granted, whatever the order of a producer's hello and its re-sent chunks:
    // a grant below them would promise the rest of the pool to rows that will never come.
    for (const member of this.members.values()) member.grant = Math.max(member.grant, ...member.received.values());
    const open = new Map<HookPoint, number>();
    for (const hook of this.gating()) open.set(hook, Math.max(0, hook.pool.free - this.promised(hook)));
    const eligible: Array<{ member: Member; hooks: HookPoint[] }> = [];
    for (const member of this.live()) {
      const hooks = member.announce.hookPoints
        .map((n) => this.buffer.hooks.get(n))
        .filter((h): h is HookPoint => h !== undefined && open.has(h));
      if (hooks.some((h) => h.refilling)) eligible.push({ member, hooks });
    }
    if (eligible.length === 0) return;
    const feeders = new Map<HookPoint, number>();
    for (const { hooks } of eligible) for (const h of hooks) feeders.set(h, (feeders.get(h) ?? 0) + 1);
    const shares = eligible.map(({ member, hooks }) => {
      const chunk = member.announce.chunkRows;
      return chunk * Math.min(...hooks.map((h) => Math.floor(open.get(h)! / (feeders.get(h)! * chunk))));
    });
    eligible.forEach(({ member, hooks }, i) => {
      member.grant += shares[i]!;
      for (const h of hooks) open.set(h, open.get(h)! - shares[i]!);
    });
    eligible.sort(
      (a, b) =>
        mostOutstanding(a.member) - mostOutstanding(b.member) || a.member.announce.producerId.localeCompare(b.member.announce.producerId),
    );
    for (let granted = true; granted;) {
      granted = false;
      for (const { member, hooks } of eligible) {
        const chunk = member.announce.chunkRows;
        if (!hooks.every((h) => open.get(h)! >= chunk)) continue;
        member.grant += chunk;
        for (const h of hooks) open.set(h, open.get(h)! - chunk);
        granted = true;
      }
    }
  }
}

function fresh(announce: MemberAnnounce): Member {
  return { announce, lastSeen: Date.now(), live: true, grant: 0, received: new Map() };
}

/** Credit a member holds for `hookPoint` and has not used yet: rows that may still arrive. */
function outstanding(member: Member, hookPoint: string): number {
  return Math.max(0, member.grant - (member.received.get(hookPoint) ?? 0));
}

function mostOutstanding(member: Member): number {
  return Math.max(0, ...member.announce.hookPoints.map((h) => outstanding(member, h)));
}
