import type { RunConfig } from "../common/config/index.js";
import { subjects } from "../common/coordination.js";
import type { Bus } from "../common/nats.js";
import { type Shard, shardFor, shardsOf } from "../common/shards.js";
import { Signal } from "../common/signal.js";
import type { ActivationChunk } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { DemandGate } from "./demand.js";
import type { InFlightLedger } from "./in-flight.js";
import { PushStream } from "./stream.js";

/** One buffer shard this producer feeds: the hook points it sends there, its push stream and its gate. */
export interface Feed {
  shard: Shard;
  hooks: string[];
  stream: PushStream;
  gate: DemandGate;
}

/** What the gates say to the production loop. */
export type Go = "produce" | "stop";

/** A feed as Status and tests see it. */
export interface FeedStatus {
  shard: number;
  address: string;
  hookPoints: string[];
  /** Chunks sent and not answered yet. */
  inFlight: number;
  pausedByBuffer: boolean;
  /** The shard takes no more rows (its trainers are done, or it was drained). */
  ended: boolean;
  contextsAllowed: number;
  /**
   * Rows of the delivered passes that went to this shard, per hook point, across restarts: what its
   * ledger of each of these hook points starts from (produced = accepted + refused).
   */
  rowsSent: Record<string, number>;
}

export interface FeedsOptions {
  config: RunConfig;
  id: string;
  /** Rows per hook point of a whole pass, and at most per context (see DemandGate). */
  chunkRows: number;
  rowsPerContext: number;
  lineage: string;
  ledger: InFlightLedger;
  /** How long a shard that ended gets to answer what is in flight before the producer leaves it. */
  flushMs: number;
  log: (line: string) => void;
}

/** The producer's hook points grouped by the buffer shard each goes to (shardFor), in shard order. */
export function feedPlan(config: RunConfig): Array<{ shard: Shard; hooks: string[] }> {
  const plan = new Map<number, { shard: Shard; hooks: string[] }>();
  for (const hook of config.producer.hookPoints) {
    const shard = shardFor(config.buffer, hook, config.producer.shardIndex);
    const entry = plan.get(shard.index) ?? { shard, hooks: [] };
    entry.hooks.push(hook);
    plan.set(shard.index, entry);
  }
  return [...plan.values()].sort((a, b) => a.shard.index - b.shard.index);
}

/**
 * Every buffer shard a producer feeds, as one gate for the production loop. One forward pass feeds
 * every hook point, so a pass starts only when every shard still taking rows grants it, and takes
 * the fewest contexts any of them allows: a shard that pauses (its pools are full) holds back the
 * others' rows too, since the pass that would feed them would make its rows as well and the dataset
 * has one position for all hook points. A shard that ends (its trainers are done) no longer counts:
 * the producer leaves it and goes on feeding the rest; the run is over for the producer once every
 * shard it feeds has ended.
 */
export class Feeds {
  readonly list: Feed[] = [];
  private readonly byHook = new Map<string, Feed>();
  /** Every gate notifies it, so one wait sees them all. */
  private readonly changed = new Signal();
  private stopped = false;
  private readonly leaving = new Map<Feed, Promise<void>>();
  /** Feeds left while others went on: what was in flight to them is no longer waited for. */
  private readonly abandoned = new Set<Feed>();

  constructor(private readonly options: FeedsOptions) {
    const { config, id, chunkRows, rowsPerContext, lineage, ledger, log } = options;
    const sharded = shardsOf(config.buffer).length > 1;
    for (const { shard, hooks } of feedPlan(config)) {
      const stream = new PushStream({
        address: shard.address,
        transport: config.transport,
        maxInFlight: config.producer.maxInFlightChunks,
        onAnswer: (chunk) => ledger.answered(chunk),
        onReconnected: (resent): Promise<void> => {
          const rows = resent.filter((c) => c.hookPoint === hooks[0]).reduce((n, c) => n + (c.activations?.shape[0] ?? 0), 0);
          return gate.rejoin(rows).catch((err: Error) => log(`${id}: rejoining buffer shard ${shard.index} failed: ${err.message}`));
        },
        log,
      });
      const gate = new DemandGate({
        subjects: subjects(config.nats.subjectPrefix, config.run.id, shard.index),
        member: { producerId: id, hookPoints: hooks, chunkRows, contextRows: rowsPerContext, lineage },
        log,
        rowsPerContext,
        marks: () => ledger.marks(hooks),
        shard: shard.index,
        scope: sharded ? `buffer shard ${shard.index}` : "run",
        changed: this.changed,
        onEnded: () => this.ended(feed),
        onShardsEnded: (ended) => this.endedElsewhere(ended, shard.index),
        inFlight: (): number => stream.inFlight,
      });
      const feed: Feed = { shard, hooks, stream, gate };
      this.list.push(feed);
      for (const hook of hooks) this.byHook.set(hook, feed);
    }
    // A shard that ended while an earlier start of this producer fed others is gone (its process
    // exited): waiting for its grant would hold back every pass.
    const gone = this.list.filter((f) => ledger.endedBefore(f.hooks));
    for (const feed of gone) {
      feed.gate.endedEarlier();
      this.abandoned.add(feed);
      void feed.stream.close();
    }
    if (gone.length) {
      const rest = this.live.map((f) => f.shard.index);
      log(
        `${id}: buffer shard(s) ${gone.map((f) => f.shard.index).join(", ")} ended before this start (the saved position says so); ` +
          (rest.length ? `feeding shard(s) ${rest.join(", ")}` : "none is left to feed"),
      );
    }
  }

  /** Joins every shard it feeds, but those that ended before this start, as the producer whose control server is at `address`. */
  async join(bus: Bus, address: string): Promise<void> {
    await Promise.all(this.live.map((f) => f.gate.join(bus, address)));
  }

  /** Feeds whose shard still takes rows. */
  private get live(): Feed[] {
    return this.list.filter((f) => !f.gate.shardEnded);
  }

  private get ending(): boolean {
    return this.stopped || this.live.length === 0;
  }

  /** True when the loop may start a forward pass now: every shard still fed grants one. */
  get open(): boolean {
    const live = this.live;
    return live.length > 0 && live.every((f) => f.gate.open);
  }

  /** Contexts the next pass may take: the fewest any shard still fed allows. */
  get contextsAllowed(): number {
    const live = this.live;
    return live.length ? Math.min(...live.map((f) => f.gate.contextsAllowed)) : 0;
  }

  /** True while a shard still fed says pause. */
  get pausedByBuffer(): boolean {
    return this.live.some((f) => f.gate.pausedByBuffer);
  }

  /** Chunks sent and not answered, every shard together. */
  get inFlight(): number {
    return this.list.reduce((n, f) => n + f.stream.inFlight, 0);
  }

  /** Whether `hookPoint`'s shard is still fed: not left while others go on (a pass converts and sends only those). */
  fed(hookPoint: string): boolean {
    return !this.abandoned.has(this.byHook.get(hookPoint)!);
  }

  /** Resolves "produce" when a pass may start, "stop" when every shard fed ended or the producer stops. */
  async wait(): Promise<Go> {
    await this.changed.until(() => this.ending || this.open);
    return this.ending ? "stop" : "produce";
  }

  /**
   * Resolves "produce" once a pass already forwarded may go out: every shard still fed says refill
   * and no operator paused the producer (its rows are within the grants, counted when it was taken);
   * "stop" once every shard fed ended or the producer stops. So a pause holds back everything but
   * the pass being pushed when it came: it takes effect within one chunk.
   */
  async deliverable(): Promise<Go> {
    await this.changed.until(() => this.ending || this.live.every((f) => f.gate.deliverableNow));
    return this.ending ? "stop" : "produce";
  }

  /** A pass took `rows` rows per hook point: counted against every shard's grant. */
  take(rows: number): void {
    for (const f of this.list) f.gate.take(rows);
  }

  /** A taken pass's rows went out. */
  sent(rows: number): void {
    for (const f of this.list) f.gate.sent(rows);
  }

  /** Sends a chunk on its shard's stream; not to a shard left (the ledger no longer waits for it). */
  async send(chunk: ActivationChunk): Promise<void> {
    const feed = this.byHook.get(chunk.hookPoint)!;
    if (this.abandoned.has(feed)) return;
    this.options.ledger.sending(chunk);
    await feed.stream.send(chunk);
  }

  setOperatorPaused(paused: boolean): void {
    for (const f of this.list) f.gate.setOperatorPaused(paused);
  }

  /** Wakes the loop for good (shutdown). */
  stop(): void {
    this.stopped = true;
    for (const f of this.list) f.gate.stop();
    this.changed.notify();
  }

  /**
   * Waits up to `timeoutMs` for every shard to answer what was sent to it; true when nothing is left
   * unanswered but on shards that ended (whose answers no longer matter).
   */
  async drainStreams(timeoutMs: number): Promise<boolean> {
    const answered = await Promise.all(this.list.map(async (f) => (await f.stream.drain(timeoutMs)) || this.abandoned.has(f)));
    return answered.every(Boolean);
  }

  /** Leaves every shard (announces leaving, stops listening); resolves once the leaves are flushed. */
  async leaveAll(): Promise<void> {
    await Promise.all(this.list.map((f) => this.leave(f)));
  }

  /** Cuts every stream at once (start-up failed). */
  async close(): Promise<void> {
    await Promise.all(this.list.map((f) => f.stream.close()));
  }

  status(): FeedStatus[] {
    return this.list.map((f) => ({
      shard: f.shard.index,
      address: f.shard.address,
      hookPoints: [...f.hooks],
      inFlight: f.stream.inFlight,
      pausedByBuffer: f.gate.pausedByBuffer,
      ended: f.gate.shardEnded,
      contextsAllowed: f.gate.contextsAllowed,
      rowsSent: Object.fromEntries(f.hooks.map((h) => [h, this.options.ledger.delivered.produced.hooks?.[h] ?? 0])),
    }));
  }

  private leave(feed: Feed): Promise<void> {
    let left = this.leaving.get(feed);
    if (!left) {
      left = feed.gate.drain();
      this.leaving.set(feed, left);
    }
    return left;
  }

  /** Shard `from` says `ended` shards ended: those this producer feeds are left as if it had heard them. */
  private endedElsewhere(ended: readonly number[], from: number): void {
    const gone = new Set(ended);
    // A shard saying so of itself can only be a mistake (its RunState says when it ends).
    gone.delete(from);
    for (const feed of this.list) {
      if (gone.has(feed.shard.index)) feed.gate.heardEnded(`buffer shard ${from}`);
    }
  }

  /**
   * A shard it feeds ended while others still take rows: passes stop waiting for its chunks (the
   * position goes on with the others), and once it answered what is in flight (or flushMs passed)
   * the producer leaves it, so that the shard need not wait for it to stop. When the last one
   * ends, the producer stops as a whole (stop() flushes and leaves every shard).
   */
  private ended(feed: Feed): void {
    const { ledger, flushMs, id, log } = this.options;
    const live = this.live;
    this.changed.notify();
    if (live.length === 0 || this.stopped) return;
    this.abandoned.add(feed);
    ledger.endHooks(feed.hooks);
    log(`${id}: leaving buffer shard ${feed.shard.index}; still feeding shard(s) ${live.map((f) => f.shard.index).join(", ")}`);
    void feed.stream.drain(flushMs).then(() => this.leave(feed));
  }
}
