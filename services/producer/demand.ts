import type { Subscription } from "@nats-io/transport-node";
import { Demand, HEARTBEAT_MS, MemberAnnounce, RunState, type Subjects } from "../common/coordination.js";
import type { Bus } from "../common/nats.js";
import { Signal } from "../common/signal.js";

const HELLO_TIMEOUT_MS = 2000;
const REJOIN_RETRY_MS = 250;
const REJOIN_WAIT_MS = 10_000;

export interface DemandGateOptions {
  /** The subjects of the buffer shard it talks to. */
  subjects: Subjects;
  /** Who this producer is to that shard: the hook points it sends there. */
  member: Omit<MemberAnnounce, "address">;
  log: (line: string) => void;
  /** Upper bound on one context's rows per hook point; chunkRows is a whole pass of them. */
  rowsPerContext?: number;
  /** How far the contexts have gone at the moment of each announcement (see MemberAnnounce.marks). */
  marks?: () => MemberAnnounce["marks"];
  /** Which buffer shard it talks to: a RunState of another shard does not concern it. */
  shard?: number;
  /** What its log lines call the end it hears of: "run", or "buffer shard <i>" in a sharded run. */
  scope?: string;
  /** Shared by the gates of one producer (one per shard), so that one wait sees every gate change. */
  changed?: Signal;
  /** Called once when its shard (or the whole run) stops taking rows. */
  onEnded?: () => void;
  /** Other shards its shard says ended (Demand.endedShards). */
  onShardsEnded?: (shards: number[]) => void;
  /** Chunks sent to the shard and not answered yet (see MemberAnnounce.settled). */
  inFlight?: () => number;
}

/**
 * The producer's side of the NATS handshake. It announces the producer (join, heartbeat, leave),
 * keeps the buffer's latest Demand, and lets the loop start a forward pass only while the buffer
 * says refill and at least one context fits in the producer's absolute grant. A pass then takes
 * as many contexts as fit (each bounded by rowsPerContext rows per hook point), at most a chunk's
 * worth: packed contexts hold fewer rows than the bound (BOS positions are dropped), so the credit
 * left after whole chunks is spent by a smaller pass instead of stranding the pool short of full.
 * The producer never sends rows it was not promised. The check happens before each pass, so a
 * pause takes effect within one chunk. An operator's Pause RPC closes the same gate. A producer
 * feeding several buffer shards has one gate per shard (see feeds.ts).
 */
export class DemandGate {
  private demand: Demand | undefined;
  private runState: RunState["state"] = "running";
  /** Every pool this producer feeds on the shard is done (its trainers finished). */
  private poolsDone = false;
  private operatorPaused = false;
  /** Demand.endedShards as last told to onShardsEnded. */
  private endedShardsSeen = "";
  private stopped = false;
  /** Rows per hook point taken since joining: sent, or in a pass still on its way. */
  private rowsSent = 0;
  /** Of those, rows of passes taken and not pushed yet. */
  private taken = 0;
  private subs: Subscription[] = [];
  private heartbeat: NodeJS.Timeout | undefined;
  private readonly changed: Signal;
  private bus: Bus | undefined;
  /** Who this producer is to the run; its address is known once it serves. */
  private me: MemberAnnounce | undefined;
  private readonly subjects: Subjects;
  private readonly member: Omit<MemberAnnounce, "address">;
  private readonly log: (line: string) => void;
  private readonly rowsPerContext: number;
  private readonly marks: () => MemberAnnounce["marks"];

  constructor(private readonly options: DemandGateOptions) {
    this.subjects = options.subjects;
    this.member = options.member;
    this.log = options.log;
    this.rowsPerContext = options.rowsPerContext ?? options.member.chunkRows;
    this.marks = options.marks ?? (() => undefined);
    this.changed = options.changed ?? new Signal();
  }

  /** This producer as announced now: who it is, how far its contexts have gone, and what the buffer has surely received. */
  private announcement(me: MemberAnnounce): MemberAnnounce {
    const marks = this.marks();
    const settled = this.taken === 0 && this.options.inFlight?.() === 0 ? this.rowsSent : undefined;
    return { ...me, ...(marks && { marks }), ...(settled !== undefined && { settled }) };
  }

  /**
   * Joins the run as the producer whose control server is at `address`: listens for demand and run
   * state, announces itself, asks the buffer for the current Demand.
   */
  async join(bus: Bus, address: string): Promise<void> {
    const me: MemberAnnounce = { ...this.member, address };
    this.bus = bus;
    this.me = me;
    this.subs.push(
      bus.subscribe(this.subjects.demand, Demand, (d) => this.apply(d)),
      bus.subscribe(this.subjects.runState, RunState, (s) => this.applyRunState(s)),
    );
    this.heartbeat = setInterval(() => bus.publish(this.subjects.heartbeat, MemberAnnounce, this.announcement(me)), HEARTBEAT_MS);
    await this.announce(bus, me);
  }

  /**
   * Joins again after the push stream had to reconnect (the buffer may have restarted). The hello
   * makes the buffer count this producer's grant afresh, as a join does (what it sent before stays
   * known to the buffer by context id, so a re-sent row is a duplicate, not a second copy); the
   * chunks re-sent on the new stream count as sent on both sides. The old grant counted from the old
   * join, so the gate stays shut until the next Demand.
   */
  async rejoin(rowsResent: number): Promise<void> {
    // A pass taken but not pushed yet goes out on the new stream too.
    this.rowsSent = rowsResent + this.taken;
    this.demand = undefined;
    const { bus, me } = this;
    if (!bus || !me) return;
    // The stream is back, so the buffer is up: re-sent rows wait until it answers the hello (it
    // listens on NATS before its port accepts), so that both sides count them from the same join.
    // A buffer that never answers (NATS down) gets them anyway after REJOIN_WAIT_MS; the settled
    // count in the heartbeats squares the grant once NATS is back.
    const until = Date.now() + REJOIN_WAIT_MS;
    for (let attempt = 0; !this.stopped && !bus.isClosed() && Date.now() < until; attempt++) {
      if (await this.announce(bus, me, attempt === 0)) return;
      await new Promise((r) => setTimeout(r, REJOIN_RETRY_MS));
    }
  }

  /**
   * Rows per hook point a pass just took: counted against the grant at once, so the pass picked
   * while this one is still forwarding is sized by what is left of the grant.
   */
  take(rows: number): void {
    this.rowsSent += rows;
    this.taken += rows;
  }

  /** A taken pass's rows went out. */
  sent(rows: number): void {
    this.taken -= rows;
  }

  setOperatorPaused(paused: boolean): void {
    this.operatorPaused = paused;
    this.changed.notify();
  }

  get pausedByOperator(): boolean {
    return this.operatorPaused;
  }

  /**
   * Its shard ended before this producer started (see Position.endedHooks): it is not joined, and no
   * pass waits for it.
   */
  endedEarlier(): void {
    this.poolsDone = true;
    this.changed.notify();
  }

  /** Another shard said this one ended (its RunState came while this producer was not listening). */
  heardEnded(from: string): void {
    if (this.shardEnded) return;
    this.leaving(`demand: ${this.scope} ended (said by ${from}); leaving it`);
    this.changed.notify();
  }

  /** True once its shard (or the whole run) drains or stops: it takes no more rows from this producer. */
  get shardEnded(): boolean {
    return this.runState !== "running" || this.poolsDone;
  }

  /** True once its shard ended or the producer stops: no more passes for it. */
  get ended(): boolean {
    return this.stopped || this.shardEnded;
  }

  /** True while a pass already taken may go out to its shard: the buffer says refill and no operator holds it. */
  get deliverableNow(): boolean {
    return !this.operatorPaused && this.demand?.command === "refill";
  }

  /** True while the buffer's latest word is pause. */
  get pausedByBuffer(): boolean {
    return this.demand?.command === "pause";
  }

  /** Contexts the next pass may take within the grant (0 when none fits), at most a chunk's worth. */
  get contextsAllowed(): number {
    const grant = this.demand?.grants[this.member.producerId] ?? 0;
    const perChunk = Math.floor(this.member.chunkRows / this.rowsPerContext);
    return Math.max(0, Math.min(perChunk, Math.floor((grant - this.rowsSent) / this.rowsPerContext)));
  }

  /** True when the loop may start a forward pass now. */
  get open(): boolean {
    return this.runState === "running" && !this.operatorPaused && this.demand?.command === "refill" && this.contextsAllowed > 0;
  }

  /** Wakes the loop for good (shutdown). */
  stop(): void {
    this.stopped = true;
    this.changed.notify();
  }

  /** Stops the loop, announces leaving and stops listening; resolves once the leave is flushed to the server. */
  async drain(): Promise<void> {
    this.stop();
    clearInterval(this.heartbeat);
    for (const s of this.subs) s.unsubscribe();
    this.subs = [];
    if (!this.bus || !this.me || this.bus.isClosed()) return;
    this.bus.publish(this.subjects.leave, MemberAnnounce, this.me);
    // Best effort: without NATS the buffer notices the silence after MEMBER_TIMEOUT_MS instead.
    await this.bus.flush();
  }

  /** Says hello; true once the buffer answered it. */
  private async announce(bus: Bus, me: MemberAnnounce, say = true): Promise<boolean> {
    const now = this.announcement(me);
    bus.publish(this.subjects.join, MemberAnnounce, now);
    try {
      this.apply(await bus.request(this.subjects.hello, MemberAnnounce, now, Demand, HELLO_TIMEOUT_MS));
      return true;
    } catch (err) {
      // No buffer yet: it will learn of this producer from its heartbeat and include it in the next Demand.
      if (say) this.log(`demand: no answer to hello (${(err as Error).message}); waiting for the buffer's demand`);
      return false;
    }
  }

  private applyRunState(s: RunState): void {
    const { shard, onEnded } = this.options;
    if (s.shard !== undefined && shard !== undefined && s.shard !== shard) return;
    const was = this.runState;
    const left = this.shardEnded;
    this.runState = s.state;
    if (s.state !== "running" && was === "running") {
      this.log(`demand: ${this.scope} is ${s.state}${s.reason ? ` (${s.reason})` : ""}; stopping`);
      // Left already when a Demand said every pool it feeds there is done.
      if (!left) onEnded?.();
    }
    this.changed.notify();
  }

  private apply(d: Demand): void {
    this.demand = d;
    // Every Demand repeats the list (256 shards a second in a large run): told on a change only.
    const ended = d.endedShards.join(",");
    if (ended !== this.endedShardsSeen) {
      this.endedShardsSeen = ended;
      if (d.endedShards.length) this.options.onShardsEnded?.(d.endedShards);
    }
    if (!this.shardEnded && this.member.hookPoints.every((h) => d.done.includes(h))) {
      this.leaving(`demand: every pool this producer feeds on ${this.scope} is done (their trainers finished); leaving it`);
    }
    this.changed.notify();
  }

  /** What its log lines call the end it hears of. */
  private get scope(): string {
    return this.options.scope ?? "run";
  }

  /** Its shard takes no more rows from this producer, as `line` says: the producer leaves it. */
  private leaving(line: string): void {
    this.poolsDone = true;
    this.log(line);
    this.options.onEnded?.();
  }
}
