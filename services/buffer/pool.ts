import { DTYPE_BYTES } from "../common/tensor-codec.js";
import type { DType } from "../gen/saeflow/v1/tensor_pb.js";
import { Rng } from "./shuffle.js";

/**
 * The preallocated pool of one hook point: `capacity` rows of `dModel` elements in the wire dtype.
 * Ring positions count up forever (held in doubles, exact to 2^53); position p lives in slot
 * p % capacity, bytes and ids alike.
 *
 *   head (slowest cursor)      fastest cursor               tail                head + capacity
 *    | read by some consumers  |  read by none yet          |  free slots        |
 *
 * Rows in [head, tail) are held. A consumer (a split group, or one fan-out trainer) is a cursor that
 * reads the ring forward, so it gets each row once; a row leaves when the slowest cursor has passed
 * it `epochs` times. The shuffle happens as rows arrive: a new row takes a uniform position among
 * the unread ones ahead of every cursor and the row that held it moves to the tail (one step of the
 * inside-out Fisher–Yates shuffle), so the unread rows are always in uniformly random order and a
 * minibatch is the next run of slots: one or two memcpys, not a gather of scattered rows.
 */
export class Cursor {
  constructor(public pos: number) {}
}

export interface PoolOptions {
  capacity: number;
  dModel: number;
  dtype: DType;
  /** Times each row is served to each cursor before its slot is freed. */
  epochs: number;
  seed: number;
  /** Largest single allocation; Node caps one buffer at 4 GiB, so big pools are split in segments of whole rows. */
  segmentBytes?: number;
}

/** Rows of one received chunk to copy in, with what is kept about each row. */
export interface ChunkRows {
  /** The chunk's activations, [rows, dModel] in the pool dtype. */
  data: Buffer;
  /** Empty or one per row. */
  tokenIds: readonly number[];
  /** One per row. */
  contextIds: readonly number[];
  /** The producer's index times 2^32, so that (producer, context) is one number. */
  contextBase: number;
  /** Buffer-wide id of the chunk's first row; row i gets firstRowId + i. */
  firstRowId: number;
  /** Refill cycle the rows arrive in. */
  cycle: number;
}

export interface Gathered {
  rows: number;
  /** Distinct (producer, context) pairs among the rows: the mixing measure. */
  distinctContexts: number;
  /** Newest refill cycle any of the rows arrived in. */
  newestCycle: number;
}

/** Per-row ids of a batch, filled when a trainer asked for them. */
export interface GatheredIds {
  rowIds: bigint[];
  tokenIds: number[];
  contextIds: number[];
}

const DEFAULT_SEGMENT_BYTES = 1 << 30;

export class Pool {
  readonly capacity: number;
  readonly dModel: number;
  readonly dtype: DType;
  readonly rowBytes: number;
  private readonly epochs: number;
  private readonly perSegment: number;
  /** Buffers rather than plain Uint8Arrays: Buffer#copy moves a row without making a view per row. */
  private readonly segments: Buffer[] = [];
  private readonly passes: Uint8Array;
  private readonly rowIds: Float64Array;
  private readonly tokenIds: Uint32Array;
  private readonly contextIds: Uint32Array;
  private readonly contextKeys: Float64Array;
  private readonly cycles: Uint32Array;
  /** Scratch for counting distinct contexts of a batch without allocating. */
  private readonly keys: Float64Array;
  private readonly distinct = new DistinctCounter();
  private readonly rng: Rng;
  private scratch: Buffer | undefined;
  private readonly cursors = new Set<Cursor>();
  private head = 0;
  private tail = 0;

  constructor(options: PoolOptions) {
    const { capacity, dModel, dtype } = options;
    this.capacity = capacity;
    this.dModel = dModel;
    this.dtype = dtype;
    this.rowBytes = dModel * DTYPE_BYTES[dtype];
    this.epochs = options.epochs;
    this.perSegment = Math.min(capacity, Math.floor((options.segmentBytes ?? DEFAULT_SEGMENT_BYTES) / this.rowBytes));
    if (this.perSegment < 1) throw new RangeError(`a row of ${this.rowBytes} bytes exceeds the segment size`);
    for (let first = 0; first < capacity; first += this.perSegment) {
      this.segments.push(Buffer.alloc(Math.min(this.perSegment, capacity - first) * this.rowBytes));
    }
    this.passes = new Uint8Array(capacity);
    this.rowIds = new Float64Array(capacity);
    this.tokenIds = new Uint32Array(capacity);
    this.contextIds = new Uint32Array(capacity);
    this.contextKeys = new Float64Array(capacity);
    this.cycles = new Uint32Array(capacity);
    this.keys = new Float64Array(capacity);
    this.rng = new Rng(options.seed);
  }

  /** Bytes allocated for rows. */
  get bytes(): number {
    return this.capacity * this.rowBytes;
  }

  /** Rows held: not yet served to every cursor. */
  get held(): number {
    return this.tail - this.head;
  }

  get free(): number {
    return this.capacity - this.held;
  }

  /** Rows `cursor` has still to read. */
  unread(cursor: Cursor): number {
    return this.tail - cursor.pos;
  }

  /** Rows ahead of the most advanced cursor: where new rows are shuffled in. */
  get shuffleWindow(): number {
    return this.tail - this.frontier();
  }

  /** A consumer that starts with every row held. */
  openCursor(): Cursor {
    const cursor = new Cursor(this.head);
    this.cursors.add(cursor);
    return cursor;
  }

  /** Forgets a consumer; returns the rows that thereby left the pool. */
  closeCursor(cursor: Cursor): number {
    this.cursors.delete(cursor);
    return this.release();
  }

  /** Copies rows [from, from + count) of a chunk into free slots, each at a uniform unread position. */
  append(chunk: ChunkRows, from: number, count: number): void {
    if (count > this.free) throw new RangeError(`append of ${count} rows with ${this.free} free`);
    const { rowBytes } = this;
    const first = this.frontier();
    for (let r = from; r < from + count; r++) {
      const slot = this.placeNext(first);
      chunk.data.copy(this.segmentOf(slot), this.offsetOf(slot), r * rowBytes, (r + 1) * rowBytes);
      const context = chunk.contextIds[r]!;
      this.rowIds[slot] = chunk.firstRowId + r;
      this.tokenIds[slot] = chunk.tokenIds.length ? chunk.tokenIds[r]! : 0;
      this.contextIds[slot] = context;
      this.contextKeys[slot] = chunk.contextBase + context;
      this.cycles[slot] = chunk.cycle;
      this.passes[slot] = 0;
    }
  }

  /**
   * Copies the next `rows` rows of `cursor` into `out` (row-major, from byte 0) and advances it. The
   * caller then calls release() to free what every cursor has passed.
   */
  take(cursor: Cursor, rows: number, out: Buffer, ids?: GatheredIds): Gathered {
    if (rows > this.unread(cursor)) throw new RangeError(`take of ${rows} rows with ${this.unread(cursor)} unread`);
    const { rowBytes, capacity, keys } = this;
    let newestCycle = 0;
    for (let i = 0, at = cursor.pos % capacity; i < rows;) {
      // The longest run of slots that is contiguous in one segment.
      const segmentEnd = (Math.floor(at / this.perSegment) + 1) * this.perSegment;
      const run = Math.min(rows - i, Math.min(capacity, segmentEnd) - at);
      const offset = this.offsetOf(at);
      this.segmentOf(at).copy(out, i * rowBytes, offset, offset + run * rowBytes);
      for (let j = 0; j < run; j++) {
        const slot = at + j;
        keys[i + j] = this.contextKeys[slot]!;
        if (this.cycles[slot]! > newestCycle) newestCycle = this.cycles[slot]!;
        if (ids) {
          ids.rowIds.push(BigInt(this.rowIds[slot]!));
          ids.tokenIds.push(this.tokenIds[slot]!);
          ids.contextIds.push(this.contextIds[slot]!);
        }
      }
      i += run;
      at = (at + run) % capacity;
    }
    cursor.pos += rows;
    return { rows, distinctContexts: this.distinct.count(keys.subarray(0, rows)), newestCycle };
  }

  /**
   * Moves the head up to the slowest cursor. A row passed fewer than `epochs` times goes back into the
   * unread order instead of leaving; returns the rows that left. With no cursor, rows stay for the
   * next consumer.
   */
  release(): number {
    if (this.cursors.size === 0) return 0;
    let slowest = this.tail;
    for (const c of this.cursors) if (c.pos < slowest) slowest = c.pos;
    const { capacity, passes } = this;
    let left = 0;
    const first = this.frontier();
    while (this.head < slowest) {
      const from = this.head % capacity;
      this.head++;
      if (passes[from]! + 1 < this.epochs) {
        // Back into the unread rows, at a uniform position among them. When the pool was full, the
        // slot it leaves is the tail slot itself, so the row and the one it displaces swap.
        const tailSlot = this.tail % capacity;
        const to = this.pick(first) % capacity;
        if (from === tailSlot) {
          if (to !== tailSlot) this.swap(to, tailSlot);
        } else {
          if (to !== tailSlot) this.move(to, tailSlot);
          this.move(from, to);
        }
        passes[to]!++;
      } else {
        left++;
      }
    }
    return left;
  }

  /** Opens the tail position and returns a uniform position in [first, tail] for the row that takes it. */
  private pick(first: number): number {
    const tail = this.tail++;
    return first + this.rng.below(tail - first + 1);
  }

  /** The slot the next new row goes to; the row that held it moves to the tail slot. */
  private placeNext(first: number): number {
    const tailSlot = this.tail % this.capacity;
    const slot = this.pick(first) % this.capacity;
    if (slot !== tailSlot) this.move(slot, tailSlot);
    return slot;
  }

  /** Exchanges two rows, bytes and ids. */
  private swap(a: number, b: number): void {
    const scratch = (this.scratch ??= Buffer.alloc(this.rowBytes));
    const offset = this.offsetOf(a);
    this.segmentOf(a).copy(scratch, 0, offset, offset + this.rowBytes);
    const ids = [this.rowIds[a]!, this.tokenIds[a]!, this.contextIds[a]!, this.contextKeys[a]!, this.cycles[a]!, this.passes[a]!] as const;
    this.move(b, a);
    scratch.copy(this.segmentOf(b), this.offsetOf(b));
    [this.rowIds[b], this.tokenIds[b], this.contextIds[b], this.contextKeys[b], this.cycles[b], this.passes[b]] = ids;
  }

  /** Copies the row in slot `from`, bytes and ids, into slot `to`. */
  private move(from: number, to: number): void {
    const offset = this.offsetOf(from);
    const source = this.segmentOf(from);
    const target = this.segmentOf(to);
    // Within one segment copyWithin makes no view; across segments Buffer#copy does the same job.
    if (source === target) source.copyWithin(this.offsetOf(to), offset, offset + this.rowBytes);
    else source.copy(target, this.offsetOf(to), offset, offset + this.rowBytes);
    this.rowIds[to] = this.rowIds[from]!;
    this.tokenIds[to] = this.tokenIds[from]!;
    this.contextIds[to] = this.contextIds[from]!;
    this.contextKeys[to] = this.contextKeys[from]!;
    this.cycles[to] = this.cycles[from]!;
    this.passes[to] = this.passes[from]!;
  }

  private segmentOf(slot: number): Buffer {
    return this.segments[Math.floor(slot / this.perSegment)]!;
  }

  private offsetOf(slot: number): number {
    return (slot % this.perSegment) * this.rowBytes;
  }

  /** Position of the most advanced cursor, or the head when there is none. */
  private frontier(): number {
    let front = this.head;
    for (const c of this.cursors) if (c.pos > front) front = c.pos;
    return front;
  }
}

/**
 * Counts distinct values among a batch's context keys with an open-addressing table reused across
 * batches: a stamp per slot says whether it belongs to this count, so nothing is cleared, and no
 * sort is needed (a sort of a 1024-row batch's keys cost more than copying its rows).
 */
export class DistinctCounter {
  private keys = new Float64Array(0);
  private stamps = new Uint32Array(0);
  private stamp = 0;

  count(values: Float64Array): number {
    if (values.length * 2 > this.keys.length) {
      const size = 2 ** Math.ceil(Math.log2(values.length * 2 + 1));
      this.keys = new Float64Array(size);
      this.stamps = new Uint32Array(size);
      this.stamp = 0;
    }
    if (++this.stamp === 0xffffffff) {
      this.stamps.fill(0);
      this.stamp = 1;
    }
    const { keys, stamps, stamp } = this;
    const mask = keys.length - 1;
    let distinct = 0;
    for (let i = 0; i < values.length; i++) {
      const v = values[i]!;
      // Keys are producer index x 2^32 + context id: mix both halves.
      let h = (Math.imul((v % 4294967296) | 0, 0x9e3779b1) ^ Math.imul((v / 4294967296) | 0, 0x85ebca6b)) & mask;
      while (stamps[h] === stamp && keys[h] !== v) h = (h + 1) & mask;
      if (stamps[h] !== stamp) {
        stamps[h] = stamp;
        keys[h] = v;
        distinct++;
      }
    }
    return distinct;
  }
}
