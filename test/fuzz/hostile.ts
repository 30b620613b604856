import { create, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import {
  type BatchesRequestSchema,
  type PushRequestSchema,
  PushRequestSchema as PushRequest,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { HUGE, type Rng } from "./support.js";

/**
 * Well-formed requests with hostile values, each with the field its answer must name and what the
 * buffer must do with it. None of them may add a row to a pool.
 */

type PushInit = MessageInitShape<typeof PushRequestSchema>;
type BatchesInit = MessageInitShape<typeof BatchesRequestSchema>;

/** What the buffer does with a hostile chunk. */
export type PushOutcome =
  /** Answered with this code and a message naming `field`; nothing kept. */
  | "refused"
  /** A chunk holding NaN or Inf: refused, its rows counted as non_finite. */
  | "non_finite"
  /** A re-sent sequence: acknowledged (OK), its rows counted as duplicate. */
  | "duplicate"
  /** A chunk of another run: the stream ends FAILED_PRECONDITION. */
  | "stream";

export interface HostileChunk {
  what: string;
  request: PushInit;
  field: string;
  outcome: PushOutcome;
  rows: number;
}

const f32 = (values: number[]) => new Uint8Array(Float32Array.from(values).buffer);

/** A well-formed chunk of `rows` rows of width `d` for `hook`, changed by `over`. */
function chunk(
  hook: string,
  d: number,
  rows: number,
  over: Record<string, unknown> = {},
  activations: Record<string, unknown> = {},
): PushInit {
  return {
    chunk: {
      runId: "test",
      hookPoint: hook,
      producerId: "fuzz",
      sequence: 0n,
      activations: { dtype: DType.FP32, shape: [rows, d], data: new Uint8Array(rows * d * 4), ...activations },
      contextIds: Array.from({ length: rows }, (_, i) => i),
      tokenIds: [],
      ...over,
    },
  };
}

/** What a hostile chunk is made for: the buffer's hook point and width, and the round's draws. */
interface Making {
  hook: string;
  d: number;
  rows: number;
  /** Use 1 MiB strings this time. */
  big: boolean;
  rng: Rng;
  freshContexts: (rows: number) => number[];
  accepted: PushInit;
}

/** One maker per hostile value, each changing one field of a well-formed chunk. */
const CHUNKS: Array<(c: Making) => HostileChunk> = [
  () => ({ what: "no chunk", request: {}, field: "chunk", outcome: "refused", rows: 0 }),
  (c) => ({
    what: "unknown hook point",
    request: chunk(c.big ? HUGE : `blocks.${c.rng.int(1e6)}.hook_resid_post`, c.d, c.rows),
    field: "chunk.hook_point",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "empty producer id",
    request: chunk(c.hook, c.d, c.rows, { producerId: "" }),
    field: "chunk.producer_id",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "1 MiB producer id",
    request: chunk(c.hook, c.d, c.rows, { producerId: c.big ? HUGE : "p".repeat(257 + c.rng.int(4096)) }),
    field: "chunk.producer_id",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "sequence past 2^53",
    request: chunk(c.hook, c.d, c.rows, { sequence: c.rng.pick([2n ** 64n - 1n, 2n ** 53n, 2n ** 63n]) }),
    field: "chunk.sequence",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "no activations",
    request: chunk(c.hook, c.d, c.rows, { activations: undefined }),
    field: "chunk.activations",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "wrong dtype",
    request: chunk(c.hook, c.d, c.rows, {}, { dtype: c.rng.pick([DType.UNSPECIFIED, DType.FP16, DType.BF16, 7, 1 << 30]) }),
    field: "chunk.activations.dtype",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "empty shape",
    request: chunk(c.hook, c.d, c.rows, {}, { shape: [] }),
    field: "chunk.activations.shape",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "shape product past 2^53",
    request: chunk(c.hook, c.d, c.rows, {}, { shape: [2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1] }),
    field: "chunk.activations.shape",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "a billion rows in ten bytes",
    request: chunk(c.hook, c.d, c.rows, {}, { shape: [1e9, c.d], data: new Uint8Array(10) }),
    field: "chunk.activations.data",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "2^32 - 1 rows",
    request: chunk(c.hook, c.d, c.rows, {}, { shape: [2 ** 32 - 1, c.d] }),
    field: "chunk.activations.data",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({ what: "zero rows", request: chunk(c.hook, c.d, 0), field: "chunk.activations.shape", outcome: "refused", rows: 0 }),
  (c) => ({
    what: "other width",
    request: chunk(c.hook, c.d, c.rows, {}, { shape: [c.rows, c.d + 1 + c.rng.int(100)] }),
    field: "chunk.activations.shape",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "missing context ids",
    request: chunk(c.hook, c.d, c.rows, { contextIds: [] }),
    field: "chunk.context_ids",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "context ids out of order",
    request: chunk(c.hook, c.d, 3, { contextIds: [5, 9, 2] }),
    field: "chunk.context_ids",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "extra token ids",
    request: chunk(c.hook, c.d, c.rows, { tokenIds: [1, 2, 3, 4, 5, 6, 7, 8, 9] }),
    field: "chunk.token_ids",
    outcome: "refused",
    rows: 0,
  }),
  (c) => ({
    what: "extra document ids",
    request: chunk(c.hook, c.d, c.rows, { documentIds: Array.from({ length: c.rows + 1 }, () => 2 ** 32 - 1) }),
    field: "chunk.document_ids",
    outcome: "refused",
    rows: 0,
  }),
  (c) => {
    const values = new Array<number>(c.rows * c.d).fill(0.5);
    values[c.rng.int(values.length)] = c.rng.pick([NaN, Infinity, -Infinity]);
    return {
      what: "NaN or Inf",
      request: chunk(c.hook, c.d, c.rows, { contextIds: c.freshContexts(c.rows) }, { data: f32(values) }),
      field: "chunk.activations.data",
      outcome: "non_finite",
      rows: c.rows,
    };
  },
  (c) => ({
    what: "a sequence already accepted",
    request: c.accepted,
    field: "",
    outcome: "duplicate",
    rows: (c.accepted.chunk!.activations as { shape: number[] }).shape[0]!,
  }),
  (c) => ({
    what: "another run",
    request: chunk(c.hook, c.d, c.rows, { runId: c.big ? HUGE : `run-${c.rng.int(1e6)}` }),
    field: "chunk.run_id",
    outcome: "stream",
    rows: 0,
  }),
];

/**
 * Hostile chunks for a buffer holding `hook` of width `d`, one of each kind. NaN chunks take fresh
 * context ids from `freshContexts` (rows below the producer's mark would be duplicates instead);
 * `accepted` is a chunk the buffer has pooled already, whose re-sending is a duplicate.
 */
export function hostileChunks(
  hook: string,
  d: number,
  rng: Rng,
  freshContexts: (rows: number) => number[],
  accepted: PushInit,
): HostileChunk[] {
  const making: Making = { hook, d, rows: 1 + rng.int(8), big: rng.next() < 0.04, rng, freshContexts, accepted };
  return CHUNKS.map((make) => make(making));
}

export const encodePush = (request: PushInit) => toBinary(PushRequest, create(PushRequest, request));

export interface HostileBatches {
  request: BatchesInit;
  field: string;
}

/** Batches requests with at least one hostile value, and the field the refusal must name. */
export function hostileBatches(hook: string, capacity: number, rng: Rng): HostileBatches[] {
  const valid = { hookPoint: hook, trainerId: "fuzz", batchSize: 1 + rng.int(capacity), maxBatches: 1n };
  const big = rng.next() < 0.04;
  return [
    { request: { ...valid, batchSize: 0 }, field: "batch_size" },
    { request: { ...valid, batchSize: 1e9 }, field: "batch_size" },
    { request: { ...valid, batchSize: 2 ** 32 - 1, maxBatches: 2n ** 64n - 1n }, field: "batch_size" },
    { request: { ...valid, batchSize: capacity + 1 + rng.int(1000) }, field: "batch_size" },
    { request: { ...valid, hookPoint: big ? HUGE : `blocks.${rng.int(1e6)}.hook_mlp_out` }, field: "hook_point" },
    { request: { ...valid, hookPoint: "" }, field: "hook_point" },
    { request: { ...valid, trainerId: "" }, field: "trainer_id" },
    { request: { ...valid, trainerId: big ? HUGE : "t".repeat(257 + rng.int(4096)) }, field: "trainer_id" },
    { request: { ...valid, group: big ? HUGE : "g".repeat(257 + rng.int(4096)) }, field: "group" },
    { request: { ...valid, share: 3 + rng.int(1000) }, field: "share" },
  ];
}
