import { DTYPE_BYTES } from "../common/tensor-codec.js";
import type { DType } from "../gen/saeflow/v1/tensor_pb.js";
import { insertRandom, Rng } from "./shuffle.js";

/**
 * The preallocated pool of one hook point: `capacity` rows of `dModel` elements in the wire dtype,
 * plus a ring `order` of slot indices. Ring positions count up forever (held in doubles, exact to
 * 2^53); position p lives at order[p % capacity].
 *
 *   head (slowest cursor)      fastest cursor               tail                head + capacity
 *    | read by some consumers  |  read by none yet          |  free slots        |
 *
 * Rows in [head, tail) are held. A consumer (a split group, or one fan-out trainer) is a cursor that
 * reads the ring forward, so it gets each row once; a row leaves when the slowest cursor has passed
 * it `epochs` times. Positions outside [head, tail) hold the free slots, so the slot for a new row
 * is order[tail % capacity]: no free list. New rows join at a random position ahead of every cursor
 * (insertRandom), which keeps the unread order a uniform shuffle: indices move, bytes never do.
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
  /** A view of each slot's row, made once: copying through it allocates nothing per row. */
  private readonly rows: Uint8Array[];
  private readonly order: Uint32Array;
  private readonly passes: Uint8Array;
  private readonly rowIds: Float64Array;
  private readonly tokenIds: Uint32Array;
  private readonly contextIds: Uint32Array;
  private readonly contextKeys: Float64Array;
  private readonly cycles: Uint32Array;
  /** Scratch for counting distinct contexts of a batch without allocating. */
  private readonly keys: Float64Array;
  private readonly rng: Rng;
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
    const perSegment = Math.floor((options.segmentBytes ?? DEFAULT_SEGMENT_BYTES) / this.rowBytes);
    if (perSegment < 1) throw new RangeError(`a row of ${this.rowBytes} bytes exceeds the segment size`);
    this.rows = new Array<Uint8Array>(capacity);
    for (let first = 0; first < capacity; first += perSegment) {
      const count = Math.min(perSegment, capacity - first);
      const segment = new Uint8Array(count * this.rowBytes);
      for (let i = 0; i < count; i++) this.rows[first + i] = segment.subarray(i * this.rowBytes, (i + 1) * this.rowBytes);
    }
    this.order = new Uint32Array(capacity);
    for (let i = 0; i < capacity; i++) this.order[i] = i;
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

  /** Copies rows [from, from + count) of a chunk into free slots and shuffles them into the unread order. */
  append(chunk: ChunkRows, from: number, count: number): void {
    if (count > this.free) throw new RangeError(`append of ${count} rows with ${this.free} free`);
    const { rowBytes, capacity, order } = this;
    const first = this.frontier();
    for (let r = from; r < from + count; r++) {
      const slot = order[this.tail % capacity]!;
      chunk.data.copy(this.rows[slot]!, 0, r * rowBytes, (r + 1) * rowBytes);
      const context = chunk.contextIds[r]!;
      this.rowIds[slot] = chunk.firstRowId + r;
      this.tokenIds[slot] = chunk.tokenIds.length ? chunk.tokenIds[r]! : 0;
      this.contextIds[slot] = context;
      this.contextKeys[slot] = chunk.contextBase + context;
      this.cycles[slot] = chunk.cycle;
      this.passes[slot] = 0;
      insertRandom(order, first, this.tail, this.rng);
      this.tail++;
    }
  }

  /**
   * Copies the next `rows` rows of `cursor` into `out` (row-major, from byte 0) and advances it. The
   * caller then calls release() to free what every cursor has passed.
   */
  take(cursor: Cursor, rows: number, out: Buffer, ids?: GatheredIds): Gathered {
    if (rows > this.unread(cursor)) throw new RangeError(`take of ${rows} rows with ${this.unread(cursor)} unread`);
    const { rowBytes, capacity, order, keys } = this;
    let at = cursor.pos % capacity;
    let newestCycle = 0;
    for (let i = 0; i < rows; i++) {
      const slot = order[at]!;
      out.set(this.rows[slot]!, i * rowBytes);
      keys[i] = this.contextKeys[slot]!;
      if (this.cycles[slot]! > newestCycle) newestCycle = this.cycles[slot]!;
      if (ids) {
        ids.rowIds.push(BigInt(this.rowIds[slot]!));
        ids.tokenIds.push(this.tokenIds[slot]!);
        ids.contextIds.push(this.contextIds[slot]!);
      }
      if (++at === capacity) at = 0;
    }
    cursor.pos += rows;
    return { rows, distinctContexts: countDistinct(keys.subarray(0, rows)), newestCycle };
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
    const { capacity, order, passes } = this;
    let left = 0;
    const first = this.frontier();
    while (this.head < slowest) {
      const at = this.head % capacity;
      const slot = order[at]!;
      this.head++;
      if (passes[slot]! + 1 < this.epochs) {
        passes[slot]!++;
        // The slot moves from the old head position to the tail; the free slot there takes its place.
        const end = this.tail % capacity;
        order[at] = order[end]!;
        order[end] = slot;
        insertRandom(order, first, this.tail, this.rng);
        this.tail++;
      } else {
        left++;
      }
    }
    return left;
  }

  /** Position of the most advanced cursor, or the head when there is none. */
  private frontier(): number {
    let front = this.head;
    for (const c of this.cursors) if (c.pos > front) front = c.pos;
    return front;
  }
}

/** Sorts `keys` in place and counts distinct values. */
function countDistinct(keys: Float64Array): number {
  if (keys.length === 0) return 0;
  keys.sort();
  let distinct = 1;
  for (let i = 1; i < keys.length; i++) if (keys[i] !== keys[i - 1]) distinct++;
  return distinct;
}
