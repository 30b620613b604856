import type { MessageInitShape } from "@bufbuild/protobuf";
import type { BufferConfig } from "../common/config/index.js";
import { ownShard, type Shard, shardsOf } from "../common/shards.js";
import { dtypeFromName } from "../common/tensor-codec.js";
import type { StatusResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { DType } from "../gen/saeflow/v1/tensor_pb.js";
import { quoted } from "../common/grpc/limits.js";
import { DROP_REASONS } from "./accounting.js";
import { HookPoint } from "./hook-point.js";
import { Instruments } from "./instruments.js";
import { Marks } from "./marks.js";
import { seedFor } from "./shuffle.js";
import type { BufferState, BufferStateFile } from "./state-file.js";

/** What the NATS side listens to. Calls are synchronous and frequent: coalesce. */
export interface BufferObserver {
  /** Rows went in or out, a refill cycle started or ended, or the state changed. */
  changed(): void;
  /** `rows` rows of a chunk from `producerId` passed the checks (duplicates too: they count against its grant). */
  received(producerId: string, hookPoint: string, rows: number): void;
  stateChanged(state: ServiceState, previous: ServiceState): void;
}

export interface BufferOptions {
  runId: string;
  /** Run seed; each hook point's shuffle derives its own from it. */
  seed: number;
  config: BufferConfig;
  /** Largest single pool allocation (tests use small ones to cover segmented pools). */
  segmentBytes?: number;
  /** Where the ledger and marks are kept across restarts; absent, a restart starts them afresh. */
  stateFile?: BufferStateFile;
}

/** Why the buffer stopped: its pools drained empty, the run ended (every trainer done), or it was closed. */
export type StopCause = "drained" | "run_ended" | "closed";

/**
 * The activation buffer, usable in-process: one HookPoint per pool of its shard (buffer.shard of
 * buffer.shards; every pool in a one-buffer run), allocated here once, and the lifecycle (running,
 * paused, draining, stopped). The gRPC handlers (service.ts) and the NATS side (refill.ts) both work
 * through it.
 */
export class ActivationBuffer {
  readonly runId: string;
  readonly config: BufferConfig;
  /** Which shard of the run this buffer is, and the pools it holds. */
  readonly shard: Shard;
  readonly dtype: DType;
  readonly hooks = new Map<string, HookPoint>();
  readonly instruments: Instruments;
  private readonly stopped: Promise<void>;
  private markStopped!: () => void;
  private currentState = ServiceState.STARTING;
  private observer: BufferObserver | undefined;
  private nextRowId = 0;
  private readonly producerIndex = new Map<string, number>();
  /** Per (producer, hook point), the first row not yet answered: re-sent rows below it are duplicates. */
  readonly marks = new Marks();
  private readonly stateFile: BufferStateFile | undefined;
  private stopCause: StopCause | undefined;
  private runEnding = false;
  /** Other shards of the run heard to drain or stop (their RunState). */
  private readonly otherShardsEnded = new Set<number>();

  constructor(options: BufferOptions) {
    this.stopped = new Promise<void>((resolve) => (this.markStopped = resolve));
    this.runId = options.runId;
    this.config = options.config;
    this.shard = ownShard(options.config);
    this.dtype = dtypeFromName(options.config.dtype);
    this.instruments = new Instruments(() => [...this.hooks.values()].map((h) => [h.name, h.pool.held / h.pool.capacity]));
    this.stateFile = options.stateFile;
    const saved = this.stateFile?.load();
    for (const { name, dModel } of options.config.hookPoints) {
      if (!this.shard.hookPoints.includes(name)) continue;
      this.hooks.set(
        name,
        new HookPoint({
          name,
          dModel,
          dtype: this.dtype,
          capacity: options.config.capacityRows,
          lowWatermark: options.config.lowWatermark,
          mixFloor: options.config.mixFloor,
          epochs: options.config.epochsPerFill,
          // Shards holding the same pool shuffle differently; shard 0 keeps a one-buffer run's seed.
          seed: seedFor(options.seed, this.shard.index === 0 ? `buffer/${name}` : `buffer/${this.shard.index}/${name}`),
          instruments: this.instruments,
          onChange: () => this.changed(),
          segmentBytes: options.segmentBytes,
          cyclesBefore: saved?.hooks[name]?.cycle ?? 0,
        }),
      );
    }
    if (saved) this.restore(saved);
    this.stateFile?.prepare();
    this.commit();
    this.currentState = ServiceState.RUNNING;
  }

  /**
   * Goes on from the ledger the buffer before this one left: its counts, its row ids, its marks, the
   * trainers done with each pool and the other shards it heard end.
   * The rows its pool held are gone with it, counted by why.
   */
  private restore(saved: BufferState): void {
    this.nextRowId = saved.nextRowId;
    this.marks.restore(saved.marks);
    for (const shard of saved.endedShards) if (shard !== this.shard.index) this.otherShardsEnded.add(shard);
    for (const [name, ledger] of Object.entries(saved.hooks)) {
      const hook = this.hooks.get(name);
      hook?.accounting.restore(ledger, ledger.held, saved.clean ? "left_at_stop" : "lost_with_buffer");
      for (const trainer of ledger.doneReaders) hook?.doneReaders.add(trainer);
    }
  }

  /** Whether its ledger and marks are kept in buffer.stateFile (then they are exact across its restarts). */
  get keepsState(): boolean {
    return this.stateFile !== undefined;
  }

  /**
   * Saves the ledger and marks (when a state file is configured). Called wherever a change is about to
   * become visible to a peer, before it does (see state-file.ts).
   */
  commit(): void {
    this.stateFile?.save(this.snapshot(this.currentState === ServiceState.STOPPED));
  }

  private snapshot(clean: boolean): BufferState {
    return {
      version: 1,
      runId: this.runId,
      clean,
      nextRowId: this.nextRowId,
      hooks: Object.fromEntries(
        [...this.hooks.values()].map((h) => [
          h.name,
          { ...h.accounting.counts(), held: h.pool.held, cycle: h.cycle, doneReaders: [...h.doneReaders] },
        ]),
      ),
      marks: this.marks.save(),
      endedShards: this.endedShards,
    };
  }

  /** Other shards heard to drain or stop, in shard order. */
  get endedShards(): number[] {
    return [...this.otherShardsEnded].sort((a, b) => a - b);
  }

  /** Another shard drained or stopped: kept (in the state file too); true when it was not known. */
  otherShardEnded(shard: number): boolean {
    if (this.otherShardsEnded.has(shard)) return false;
    this.otherShardsEnded.add(shard);
    this.commit();
    return true;
  }

  /**
   * Why `hookPoint` has no pool here, for a refusal naming the field: the shards that hold it, or that
   * no shard of the run does.
   */
  notHeld(hookPoint: string): string {
    const mine = `this buffer (shard ${this.shard.index}) holds ${[...this.hooks.keys()].join(", ")}`;
    const holding = shardsOf(this.config).filter((s) => s.hookPoints.includes(hookPoint));
    if (holding.length === 0) return `unknown hook point ${quoted(hookPoint)}; ${mine}`;
    const where = holding.map((s) => `shard ${s.index} (${s.address})`).join(", ");
    return `${quoted(hookPoint)} is held by ${where}, not here; ${mine}`;
  }

  /** Resolves once the buffer is stopped: drained empty, or closed. Never rejects. */
  closed(): Promise<void> {
    return this.stopped;
  }

  get state(): ServiceState {
    return this.currentState;
  }

  /** Pool bytes allocated, all hook points together. */
  get bytes(): number {
    return [...this.hooks.values()].reduce((sum, h) => sum + h.pool.bytes, 0);
  }

  /** Why the buffer stopped; undefined while it has not. */
  get stoppedBecause(): StopCause | undefined {
    return this.stopCause;
  }

  /** Whether pushes are refused: draining or stopped. */
  get closedToPushes(): boolean {
    return this.currentState === ServiceState.DRAINING || this.currentState === ServiceState.STOPPED;
  }

  setObserver(observer: BufferObserver | undefined): void {
    this.observer = observer;
  }

  received(producerId: string, hookPoint: string, rows: number): void {
    this.observer?.received(producerId, hookPoint, rows);
  }

  /** The producer's index times 2^32, so a (producer, context id) pair is one exact double. */
  contextBase(producerId: string): number {
    let index = this.producerIndex.get(producerId);
    if (index === undefined) {
      index = this.producerIndex.size;
      this.producerIndex.set(producerId, index);
    }
    return index * 4294967296;
  }

  /** Reserves `rows` buffer-wide row ids and returns the first. */
  claimRowIds(rows: number): number {
    const first = this.nextRowId;
    this.nextRowId += rows;
    return first;
  }

  pause(): ServiceState {
    if (this.currentState === ServiceState.RUNNING) this.setState(ServiceState.PAUSED);
    return this.currentState;
  }

  resume(): ServiceState {
    if (this.currentState === ServiceState.PAUSED) this.setState(ServiceState.RUNNING);
    return this.currentState;
  }

  /** Stops accepting pushes; streams get what is held, then end. Stopped once every pool is empty. */
  drain(): ServiceState {
    if (this.currentState === ServiceState.RUNNING || this.currentState === ServiceState.PAUSED) this.setState(ServiceState.DRAINING);
    this.changed();
    return this.currentState;
  }

  /** The run is over (every trainer done): pushes are refused from now on and producers are told to stop. */
  endRun(): void {
    this.runEnding = true;
    this.drain();
  }

  /** True once endRun() was called. */
  get endingRun(): boolean {
    return this.runEnding;
  }

  /**
   * Ends every stream and span; the pools stay readable for a last Status. Closed for any other cause
   * than the run's end, trainers' streams end UNAVAILABLE, so that they reconnect to its successor.
   */
  close(cause: StopCause = "closed"): void {
    this.stopCause ??= cause;
    if (this.currentState !== ServiceState.STOPPED) this.setState(ServiceState.STOPPED);
    for (const h of this.hooks.values()) h.close();
    this.instruments.close();
    this.commit();
  }

  status(producers: readonly string[]): MessageInitShape<typeof StatusResponseSchema> {
    return {
      state: this.currentState,
      runId: this.runId,
      producers: [...producers],
      shard: this.shard.index,
      shardCount: shardsOf(this.config).length,
      hookPoints: [...this.hooks.values()].map((h) => ({
        hookPoint: h.name,
        dModel: h.pool.dModel,
        capacityRows: BigInt(h.pool.capacity),
        unconsumedRows: BigInt(h.pool.held),
        fillFraction: h.pool.held / h.pool.capacity,
        rowsIn: BigInt(h.accounting.rowsIn),
        rowsOut: BigInt(h.accounting.rowsOut),
        dropped: DROP_REASONS.filter((r) => h.accounting.dropped[r] > 0).map((reason) => ({
          reason,
          rows: BigInt(h.accounting.dropped[reason]),
        })),
        refillCycles: BigInt(h.cycle),
        trainerWaitMs: h.waitMs,
        meanDistinctContexts: h.meanDistinctContexts,
        trainers: [...h.streams].map((s) => ({
          trainerId: s.trainerId,
          group: s.group,
          batches: BigInt(s.batches),
          rows: BigInt(s.rows),
          waitMs: s.waitMs,
        })),
        refilling: h.refilling,
      })),
    };
  }

  private changed(): void {
    if (this.currentState === ServiceState.DRAINING && [...this.hooks.values()].every((h) => h.pool.held === 0)) {
      this.stopCause ??= "drained";
      this.setState(ServiceState.STOPPED);
      this.commit();
    }
    this.observer?.changed();
  }

  private setState(state: ServiceState): void {
    const previous = this.currentState;
    this.currentState = state;
    if (state === ServiceState.STOPPED) this.markStopped();
    // Waiting pushes and streams re-check the state.
    for (const h of this.hooks.values()) {
      h.rowsAdded.notify();
      h.spaceFreed.notify();
    }
    this.observer?.stateChanged(state, previous);
    this.observer?.changed();
  }
}
