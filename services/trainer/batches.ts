import type { ClientReadableStream } from "@grpc/grpc-js";
import { status as grpcStatus } from "@grpc/grpc-js";
import ort from "onnxruntime-node";
import { ConfigError, type RunConfig } from "../common/config/index.js";
import type { DTypeName } from "../common/config/sections/dtype.js";
import type { ServiceClient } from "../common/grpc/adapter.js";
import { checkTensor, decodeFloats, dtypeFromName, dtypeName, fromTensor } from "../common/tensor-codec.js";
import { shardsHolding } from "../common/shards.js";
import { type BatchesResponse, BufferService, ShareMode } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { checkWidth, processHookPoints } from "./hook.js";

/** One minibatch of activations, [rows, dModel], in the wire dtype (fp16 and bf16 as raw words). */
export interface Batch {
  data: Float32Array | Uint16Array;
  dtype: DTypeName;
  rows: number;
  dModel: number;
  /** W3C traceparent of the buffer span the rows came from, for a span link. */
  traceparent: string;
}

/**
 * The batch as the graphs' x input: fp16 and fp32 wrap the batch's memory; bf16 is widened to fp32
 * (onnxruntime-node takes no bf16), into `bf16Rows` when given, which the next call then reuses.
 */
export function batchTensor(batch: Batch, bf16Rows?: Float32Array): ort.Tensor {
  const dims = [batch.rows, batch.dModel];
  if (batch.dtype === "fp16") return new ort.Tensor("float16", batch.data as Uint16Array, dims);
  if (batch.dtype === "fp32") return new ort.Tensor("float32", batch.data as Float32Array, dims);
  return new ort.Tensor("float32", decodeFloats(batch.data, dtypeFromName("bf16"), bf16Rows), dims);
}

/** The batch widened to float32 (into `into` when given, which the next call then reuses); fp32 is wrapped as it is. */
export function floatTensor(batch: Batch, into?: Float32Array): ort.Tensor {
  return new ort.Tensor("float32", decodeFloats(batch.data, dtypeFromName(batch.dtype), batch.dtype === "fp32" ? undefined : into), [
    batch.rows,
    batch.dModel,
  ]);
}

/**
 * A 16-bit batch (fp16 or bf16) as its raw words read in pairs, [rows, dModel/2] uint32, for a step
 * graph that widens them on its device (graph/half.ts). The words are viewed in place when 4-byte
 * aligned.
 */
export function halfWords(batch: Batch): ort.Tensor {
  if (batch.dtype === "fp32") throw new Error("a step graph fed 16-bit words was given an fp32 batch");
  const words = batch.data as Uint16Array;
  const aligned = words.byteOffset % 4 === 0 ? words : words.slice();
  return new ort.Tensor("uint32", new Uint32Array(aligned.buffer, aligned.byteOffset, aligned.length / 2), [batch.rows, batch.dModel / 2]);
}

/** Where the trainer's batches come from. */
export interface BatchSource {
  /** The next batch; undefined once the source has ended or been closed. */
  next(): Promise<Batch | undefined>;
  /** Ends the source; a pending next() resolves undefined. */
  close(): void;
}

/** Batches held in memory, e.g. to replay the same stream in tests and benchmarks. */
export class ArrayBatchSource implements BatchSource {
  private at = 0;
  private closed = false;

  constructor(private readonly batches: readonly Batch[]) {}

  async next(): Promise<Batch | undefined> {
    return this.closed ? undefined : this.batches[this.at++];
  }

  close(): void {
    this.closed = true;
  }
}

type BufferClient = ServiceClient<typeof BufferService>;

/** One Batches stream of a trainer: a hook point, from one buffer shard holding it. */
export interface StreamOf {
  hookPoint: string;
  /** The shard's address. */
  address: string;
}

/** The stream of the process's first hook point from the first shard holding it: a one-shard, one-hook run's only stream. */
export function firstStream(config: RunConfig): StreamOf {
  const hookPoint = processHookPoints(config)[0]!;
  const shard = shardsHolding(config.buffer, hookPoint)[0];
  if (!shard) throw ConfigError.at("buffer.shards", `no shard holds the pool ${hookPoint}`);
  return { hookPoint, address: shard.address };
}

/**
 * Checks the buffer shard serves the stream's hook point at its pool's width, so a mismatch is
 * refused before training with an error naming the key at fault.
 */
export async function checkBufferPool(client: BufferClient, config: RunConfig, stream: StreamOf = firstStream(config)): Promise<void> {
  const { hookPoint, address } = stream;
  const status = await client.status({});
  const pool = status.hookPoints.find((h) => h.hookPoint === hookPoint);
  if (!pool) {
    const served = status.hookPoints.map((h) => h.hookPoint).join(", ") || "none";
    throw ConfigError.at(
      `trainer.hookPoints.${config.trainer.hookPoints.indexOf(hookPoint)}`,
      `the buffer at ${address} has no pool "${hookPoint}" (it serves ${served})`,
    );
  }
  checkWidth(config, hookPoint, pool.dModel, `the buffer at ${address} holds`);
}

/**
 * The buffer's Batches stream as a BatchSource. At most `prefetch` batches wait decoded; beyond
 * that the stream is paused and gRPC flow control holds the buffer back.
 */
export class GrpcBatchSource implements BatchSource {
  private readonly call: ClientReadableStream<BatchesResponse>;
  private readonly queue: Batch[] = [];
  private waiter: ((b: Batch | undefined) => void) | undefined;
  private failer: ((err: Error) => void) | undefined;
  private failure: Error | undefined;
  private ended = false;
  private closed = false;

  constructor(
    client: BufferClient,
    private readonly config: RunConfig,
    private readonly prefetch = 2,
    private readonly stream: StreamOf = firstStream(config),
  ) {
    const t = config.trainer;
    this.call = client.batches({
      hookPoint: stream.hookPoint,
      trainerId: t.id,
      group: t.group,
      batchSize: t.batchSize,
      share: t.share === "split" ? ShareMode.SPLIT : ShareMode.FAN_OUT,
      maxBatches: 0n,
      includeIds: false,
    });
    this.call.on("data", (msg: BatchesResponse) => this.onData(msg));
    this.call.on("end", () => this.finish());
    this.call.on("error", (err: Error & { code?: number }) => {
      if (this.closed && err.code === grpcStatus.CANCELLED) this.finish();
      else this.fail(err);
    });
  }

  private decode(msg: BatchesResponse): Batch {
    const t = this.config.trainer;
    checkTensor(msg.activations, "batch.activations", { shape: [undefined, undefined] });
    const tensor = msg.activations!;
    const [rows, width] = tensor.shape as [number, number];
    checkWidth(this.config, this.stream.hookPoint, width, `the buffer at ${this.stream.address} sent`);
    if (rows !== t.batchSize) throw new Error(`the buffer sent a batch of ${rows} rows; trainer.batchSize is ${t.batchSize}`);
    return { data: fromTensor(tensor), dtype: dtypeName(tensor.dtype), rows, dModel: width, traceparent: msg.traceparent };
  }

  private onData(msg: BatchesResponse): void {
    let batch: Batch;
    try {
      batch = this.decode(msg);
    } catch (err) {
      this.fail(err as Error);
      this.call.cancel();
      return;
    }
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.failer = undefined;
      w(batch);
      return;
    }
    this.queue.push(batch);
    if (this.queue.length >= this.prefetch) this.call.pause();
  }

  private finish(): void {
    this.ended = true;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = this.failer = undefined;
      w(undefined);
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    this.ended = true;
    if (this.failer) {
      const f = this.failer;
      this.waiter = this.failer = undefined;
      f(err);
    }
  }

  next(): Promise<Batch | undefined> {
    const batch = this.queue.shift();
    if (batch) {
      if (this.queue.length < this.prefetch && !this.ended) this.call.resume();
      return Promise.resolve(batch);
    }
    if (this.failure && !this.closed) return Promise.reject(this.failure);
    if (this.ended || this.closed) return Promise.resolve(undefined);
    this.call.resume();
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.failer = reject;
    });
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.call.cancel();
    this.finish();
  }
}
