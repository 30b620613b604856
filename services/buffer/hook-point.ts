import type { Link, Span } from "@opentelemetry/api";
import { traceparentOf } from "../common/telemetry.js";
import type { DType } from "../gen/saeflow/v1/tensor_pb.js";
import { Accounting } from "./accounting.js";
import type { Instruments } from "./instruments.js";
import { type ChunkRows, type Cursor, type Gathered, type GatheredIds, Pool } from "./pool.js";
import { Signal } from "../common/signal.js";

export interface HookPointOptions {
  name: string;
  dModel: number;
  dtype: DType;
  capacity: number;
  lowWatermark: number;
  mixFloor: number;
  epochs: number;
  seed: number;
  instruments: Instruments;
  /** Called after anything that may change refill demand: rows in or out, a refill cycle starting or ending. */
  onChange: () => void;
  segmentBytes?: number;
  /** Refill cycles the buffer this one replaces had begun, so that cycles count on across a restart. */
  cyclesBefore?: number;
}

/** What Status shows of one trainer stream. */
export interface StreamStats {
  trainerId: string;
  group: string;
  batches: number;
  rows: number;
  waitMs: number;
}

export interface Batch extends Gathered {
  /** Refill cycle the pool is in. */
  cycle: number;
  /** traceparent of the refill-cycle span of the batch's newest rows. */
  traceparent: string;
}

/** Refill-cycle spans whose traceparent batches may still need; rows older than this many cycles are long gone. */
const KEPT_CYCLES = 64;

/**
 * One hook point: its pool, its ledger and its refill cycle. A cycle starts when the held rows fall
 * to the low watermark (refill asked) and ends when the pool is full (pause); serving starts once
 * the pool was first full, as Llama Scope (He et al., 2024) does, so the first batches are not drawn from a few contexts.
 */
export class HookPoint {
  readonly name: string;
  readonly pool: Pool;
  readonly accounting: Accounting;
  /** Held rows at or under which a refill cycle starts. */
  readonly lowRows: number;
  /** Unread rows a cursor must have before a batch is drawn (draining excepted). */
  readonly floorRows: number;
  readonly rowsAdded = new Signal();
  readonly spaceFreed = new Signal();
  readonly streams = new Set<StreamStats>();
  cycle = 0;
  refilling = false;
  /** Trainers that announced they are done with this pool (see run-end.ts). */
  readonly doneReaders = new Set<string>();
  /**
   * Every trainer reading this pool is done: it asks for no rows (grants and pause ignore it) and
   * rows pushed to it are refused as draining; what it holds stays held.
   */
  readersDone = false;
  primed = false;
  waitMs = 0;
  private fullSlack = 0;
  private stranded = false;
  private cycleSpan: Span | undefined;
  private cycleRows = 0;
  private readonly traceparents = new Map<number, string>();
  private distinctSum = 0;
  private distinctBatches = 0;
  private lastFillDistinct = 0;
  private readonly instruments: Instruments;
  private readonly onChange: () => void;
  private readonly attributes: { hook_point: string };

  constructor(options: HookPointOptions) {
    this.name = options.name;
    this.instruments = options.instruments;
    this.onChange = options.onChange;
    this.attributes = { hook_point: options.name };
    this.pool = new Pool({
      capacity: options.capacity,
      dModel: options.dModel,
      dtype: options.dtype,
      epochs: options.epochs,
      seed: options.seed,
      segmentBytes: options.segmentBytes,
    });
    this.accounting = new Accounting(options.name, options.instruments);
    this.cycle = options.cyclesBefore ?? 0;
    this.lowRows = Math.floor(options.lowWatermark * options.capacity);
    this.floorRows = Math.ceil(options.mixFloor * options.capacity);
    this.settle();
  }

  /** Full: no chunk of the smallest size its producers send would fit any more, or no grant can add rows (setStranded). */
  get isFull(): boolean {
    return this.pool.free <= this.fullSlack || this.stranded;
  }

  /** Mean distinct contexts per batch in the current fill, or the last one before its first batch. */
  get meanDistinctContexts(): number {
    return this.distinctBatches ? this.distinctSum / this.distinctBatches : this.lastFillDistinct;
  }

  /** Sets the smallest chunk (rows) the live producers of this hook point send; 0 when none is known. */
  setSmallestChunk(rows: number): void {
    const slack = Math.max(0, rows - 1);
    if (slack === this.fullSlack) return;
    this.fullSlack = slack;
    this.settle();
    // Being full may now start serving (primed) without a row added.
    this.rowsAdded.notify();
    this.onChange();
  }

  /**
   * Says whether no row can come any more: no chunk can be granted into the rows nobody was promised,
   * and no producer holds credit it can spend (see RefillCoordinator). The pool then counts as full
   * though more than a chunk is free.
   */
  setStranded(stranded: boolean): void {
    if (stranded === this.stranded) return;
    this.stranded = stranded;
    this.settle();
    this.rowsAdded.notify();
    this.onChange();
  }

  /** No trainer will read this pool any more (see readersDone). */
  finishReaders(): void {
    if (this.readersDone) return;
    this.readersDone = true;
    // A push waiting for room is refused now rather than after pushWaitMs.
    this.spaceFreed.notify();
    this.onChange();
  }

  /** Pools rows [from, from + count) of a chunk. `link` is the producer span that made it. */
  add(chunk: ChunkRows, from: number, count: number, link: Link | undefined): void {
    const shuffle = this.instruments.tracer.startSpan("buffer.shuffle", {
      attributes: { ...this.attributes, rows: count, bytes: count * this.pool.rowBytes, window_rows: this.pool.shuffleWindow + count },
    });
    this.pool.append(chunk, from, count);
    shuffle.end();
    this.accounting.pooled(count);
    this.cycleRows += count;
    if (link) this.cycleSpan?.addLink(link);
    this.settle();
    this.rowsAdded.notify();
    this.onChange();
  }

  /** Gathers the next `rows` rows of `cursor` into `out` and frees what every consumer has passed. */
  take(cursor: Cursor, rows: number, out: Buffer, ids?: GatheredIds): Batch {
    const gathered = this.pool.take(cursor, rows, out, ids);
    this.distinctSum += gathered.distinctContexts;
    this.distinctBatches++;
    this.freed(this.pool.release());
    return { ...gathered, cycle: this.cycle, traceparent: this.traceparents.get(gathered.newestCycle) ?? "" };
  }

  closeCursor(cursor: Cursor): void {
    this.freed(this.pool.closeCursor(cursor));
  }

  recordWait(ms: number): void {
    if (ms <= 0) return;
    this.waitMs += ms;
    this.instruments.trainerWaitMs.add(ms, this.attributes);
  }

  /** Ends the open refill-cycle span (shutdown). */
  close(): void {
    this.cycleSpan?.end();
    this.cycleSpan = undefined;
  }

  private freed(rows: number): void {
    this.accounting.served(rows);
    this.settle();
    if (rows > 0) this.spaceFreed.notify();
    this.onChange();
  }

  /** Starts a refill cycle at the low watermark and ends it when the pool is full. */
  private settle(): void {
    const full = this.isFull;
    if (full) this.primed = true;
    if (!this.refilling && !full && this.pool.held <= this.lowRows) {
      this.refilling = true;
      this.cycle++;
      this.cycleRows = 0;
      this.lastFillDistinct = this.meanDistinctContexts;
      this.distinctSum = 0;
      this.distinctBatches = 0;
      this.instruments.refillCycles.add(1, this.attributes);
      this.cycleSpan = this.instruments.tracer.startSpan("buffer.refill_cycle", {
        root: true,
        attributes: { ...this.attributes, cycle: this.cycle, held_rows: this.pool.held, capacity_rows: this.pool.capacity },
      });
      this.traceparents.set(this.cycle, traceparentOf(this.cycleSpan));
      if (this.traceparents.size > KEPT_CYCLES) this.traceparents.delete(this.traceparents.keys().next().value!);
    } else if (this.refilling && full) {
      this.refilling = false;
      this.cycleSpan?.setAttributes({ rows_added: this.cycleRows, bytes_added: this.cycleRows * this.pool.rowBytes });
      this.cycleSpan?.end();
      this.cycleSpan = undefined;
    }
  }
}
