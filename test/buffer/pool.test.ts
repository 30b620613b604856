import assert from "node:assert/strict";
import { test } from "node:test";
import { type ChunkRows, DistinctCounter, Pool } from "../../services/buffer/pool.js";
import { Rng } from "../../services/buffer/shuffle.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

const WIDTH = 4;

/** `rows` rows of context `context`; row i of the chunk holds [firstRowId + i, context, i, 7]. */
function chunk(firstRowId: number, rows: number, context: number): ChunkRows {
  const values = new Float32Array(rows * WIDTH);
  for (let i = 0; i < rows; i++) values.set([firstRowId + i, context, i, 7], i * WIDTH);
  return {
    data: Buffer.from(values.buffer),
    tokenIds: [],
    contextIds: new Array<number>(rows).fill(context),
    contextBase: 0,
    firstRowId,
    cycle: 1,
  };
}

function pool(capacity: number, options: { epochs?: number; segmentBytes?: number } = {}): Pool {
  return new Pool({ capacity, dModel: WIDTH, dtype: DType.FP32, epochs: options.epochs ?? 1, seed: 1, segmentBytes: options.segmentBytes });
}

/** Fills `p` with `contexts` contexts of `rows` rows, numbering rows from `first`. */
function fill(p: Pool, first: number, contexts: number, rows: number): void {
  for (let c = 0; c < contexts; c++) p.append(chunk(first + c * rows, rows, first + c), 0, rows);
}

/** Takes `rows` rows and returns the row ids read back from the gathered bytes. */
function take(p: Pool, cursor: ReturnType<Pool["openCursor"]>, rows: number): number[] {
  const out = Buffer.alloc(rows * WIDTH * 4);
  const ids = { rowIds: [] as bigint[], tokenIds: [] as number[], contextIds: [] as number[] };
  p.take(cursor, rows, out, ids);
  p.release();
  const values = new Float32Array(out.buffer, out.byteOffset, rows * WIDTH);
  const fromBytes = Array.from({ length: rows }, (_, i) => values[i * WIDTH]!);
  assert.deepEqual(fromBytes, ids.rowIds.map(Number), "gathered bytes belong to the ids reported");
  for (let i = 0; i < rows; i++) assert.equal(values[i * WIDTH + 3], 7, "rows are copied whole");
  return fromBytes;
}

const range = (n: number, from = 0) => Array.from({ length: n }, (_, i) => from + i);
const sorted = (xs: number[]) => [...xs].sort((a, b) => a - b);

test("a cursor reads every row once, in shuffled order", () => {
  const p = pool(128);
  fill(p, 0, 8, 16);
  const cursor = p.openCursor();
  const got: number[] = [];
  while (p.unread(cursor) > 0) got.push(...take(p, cursor, 32));
  assert.deepEqual(sorted(got), range(128));
  assert.notDeepEqual(got, range(128));
  assert.equal(p.held, 0);
});

test("fan-out cursors each read every row, and a slot frees only when both passed it", () => {
  const p = pool(64);
  fill(p, 0, 4, 16);
  const a = p.openCursor();
  const b = p.openCursor();
  const gotA = take(p, a, 48);
  assert.equal(p.free, 0, "b has not read them yet");
  const gotB = take(p, b, 32);
  assert.equal(p.free, 32);
  gotA.push(...take(p, a, 16));
  gotB.push(...take(p, b, 32));
  assert.deepEqual(sorted(gotA), range(64));
  assert.deepEqual(sorted(gotB), range(64));
  assert.equal(p.held, 0);
});

test("rows that arrive later join ahead of every cursor", () => {
  const p = pool(64);
  fill(p, 0, 2, 16);
  const a = p.openCursor();
  const b = p.openCursor();
  const gotA = take(p, a, 24);
  fill(p, 32, 2, 16);
  const gotB: number[] = [];
  while (p.unread(a) > 0) gotA.push(...take(p, a, 8));
  while (p.unread(b) > 0) gotB.push(...take(p, b, 8));
  assert.deepEqual(sorted(gotA), range(64));
  assert.deepEqual(sorted(gotB), range(64));
});

test("without a cursor rows stay for the next consumer", () => {
  const p = pool(32);
  fill(p, 0, 2, 16);
  const a = p.openCursor();
  take(p, a, 8);
  assert.equal(p.closeCursor(a), 0);
  assert.equal(p.held, 24);
  const b = p.openCursor();
  assert.equal(p.unread(b), 24);
});

test("with two epochs each row is read twice before its slot frees", () => {
  const p = pool(64, { epochs: 2 });
  fill(p, 0, 4, 16);
  const cursor = p.openCursor();
  const got: number[] = [];
  let left = 0;
  while (p.unread(cursor) > 0) {
    // A row goes back into the unread order only once read, so unread rows are not a count of reads left.
    const rows = Math.min(16, p.unread(cursor));
    const out = Buffer.alloc(rows * WIDTH * 4);
    const ids = { rowIds: [] as bigint[], tokenIds: [] as number[], contextIds: [] as number[] };
    p.take(cursor, rows, out, ids);
    left += p.release();
    got.push(...ids.rowIds.map(Number));
  }
  assert.equal(got.length, 128);
  assert.deepEqual(
    sorted(got),
    range(64).flatMap((i) => [i, i]),
  );
  assert.equal(left, 64);
  assert.equal(p.held, 0);
});

test("a pool split into segments gathers the same rows", () => {
  // 16-byte rows, 40-byte segments: two rows per segment, 17 segments (the last holds one row).
  const p = pool(33, { segmentBytes: 40 });
  fill(p, 0, 3, 11);
  const cursor = p.openCursor();
  const got = take(p, cursor, 33);
  assert.deepEqual(sorted(got), range(33));
});

test("a batch drawn after a refill mixes new and old contexts", () => {
  const p = pool(1024);
  fill(p, 0, 16, 64);
  const cursor = p.openCursor();
  const out = Buffer.alloc(128 * WIDTH * 4);
  for (let i = 0; i < 4; i++) {
    p.take(cursor, 128, out);
    p.release();
  }
  fill(p, 1024, 8, 64);
  const batch = p.take(cursor, 128, out);
  // Unshuffled, 128 rows would span 2 contexts of 64; drawn at random from 24 they span most of them.
  assert.ok(batch.distinctContexts >= 12, `${batch.distinctContexts} distinct contexts`);
});

test("the seeded generator is uniform enough and reproducible", () => {
  const a = new Rng(42);
  const b = new Rng(42);
  const counts = new Array<number>(10).fill(0);
  for (let i = 0; i < 100000; i++) {
    const x = a.below(10);
    assert.equal(x, b.below(10));
    counts[x]!++;
  }
  for (const c of counts) assert.ok(Math.abs(c - 10000) < 600, `bucket count ${c}`);
});

test("the served order is a uniform permutation: every row is equally likely at every position", () => {
  const n = 8;
  const trials = 8000;
  const counts = Array.from({ length: n }, () => new Array<number>(n).fill(0));
  for (let seed = 0; seed < trials; seed++) {
    const p = new Pool({ capacity: n, dModel: WIDTH, dtype: DType.FP32, epochs: 1, seed });
    p.append(chunk(0, n, 0), 0, n);
    const cursor = p.openCursor();
    take(p, cursor, n).forEach((row, position) => counts[row]![position]!++);
  }
  // Each cell expects trials / n = 1000; a 4-sigma band (sigma ~ 29.6) catches a biased shuffle.
  for (const row of counts) for (const c of row) assert.ok(Math.abs(c - trials / n) < 120, `cell count ${c}`);
});

test("with two epochs a full pool serves every row twice, whole, however its slots wrap", () => {
  const p = pool(48, { epochs: 2, segmentBytes: 16 * WIDTH * 4 });
  fill(p, 0, 3, 16);
  assert.equal(p.free, 0);
  const cursor = p.openCursor();
  const got: number[] = [];
  while (p.unread(cursor) > 0) got.push(...take(p, cursor, Math.min(12, p.unread(cursor))));
  assert.deepEqual(sorted(got), sorted([...range(48), ...range(48)]));
  assert.equal(p.held, 0);
});

test("distinct contexts of a batch are counted exactly, batch after batch", () => {
  const counter = new DistinctCounter();
  const rng = new Rng(3);
  for (let trial = 0; trial < 200; trial++) {
    const n = 1 + rng.below(3000);
    const values = Float64Array.from({ length: n }, () => rng.below(4) * 4294967296 + rng.below(1 + rng.below(500)));
    assert.equal(counter.count(values), new Set(values).size);
  }
});
