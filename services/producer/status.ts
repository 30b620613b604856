import type { FeedStatus } from "./feeds.js";
import { create } from "@bufbuild/protobuf";
import type { ProducerConfig } from "../common/config/index.js";
import { type StatusResponse, StatusResponseSchema } from "../gen/saeflow/producer/v1/producer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { Position } from "./dataset/position.js";
import { displayName, type SourceFile } from "./dataset/sources.js";

/** tokens_per_second is measured over this window. */
const RATE_WINDOW_MS = 10_000;

/** What the producer has done so far: its state and what it sent, with the recent token rate. */
export class ProducerProgress {
  state: ServiceState = ServiceState.STARTING;
  tokens = 0;
  /** Rows per hook point. */
  rows = 0;
  bytes = 0;
  /** (time, tokens so far) samples, the oldest within the rate window first. */
  private readonly samples: Array<[number, number]> = [];

  /** Production starts: the rate counts from now. */
  started(): void {
    this.samples.push([Date.now(), this.tokens]);
  }

  /** A pass of `tokens` went out as `rows` rows per hook point, `bytes` in all. */
  sent(tokens: number, rows: number, bytes: number): void {
    this.tokens += tokens;
    this.rows += rows;
    this.bytes += bytes;
    this.samples.push([Date.now(), this.tokens]);
  }

  /** Tokens per second over the last RATE_WINDOW_MS (0 before two samples). */
  tokensPerSecond(now = Date.now()): number {
    while (this.samples.length > 1 && this.samples[0]![0] < now - RATE_WINDOW_MS) this.samples.shift();
    const first = this.samples[0];
    const seconds = first ? (now - first[0]) / 1000 : 0;
    return first && seconds > 0 ? (this.tokens - first[1]) / seconds : 0;
  }
}

/** What a status answer is made of. */
export interface StatusSources {
  id: string;
  producer: ProducerConfig;
  files: readonly SourceFile[];
  progress: ProducerProgress;
  delivered: () => Position;
  pausedByBuffer: () => boolean;
  feeds: () => FeedStatus[];
}

/** The producer's Status answer, as the RPC and the in-process handle both give it. */
export function producerStatus(s: StatusSources): StatusResponse {
  const { progress, producer: p } = s;
  const delivered = s.delivered();
  const file = s.files[delivered.cursor.fileIndex];
  return create(StatusResponseSchema, {
    state: progress.state,
    producerId: s.id,
    hookPoints: p.hookPoints,
    // Delivered passes, counted across restarts (the saved position carries them): the ledger's "produced".
    tokens: BigInt(delivered.produced.tokens),
    rowsSent: BigInt(delivered.produced.rows * p.hookPoints.length),
    bytesSent: BigInt(progress.bytes),
    tokensPerSecond: progress.tokensPerSecond(),
    position: {
      fileIndex: delivered.cursor.fileIndex,
      file: file ? displayName(file.path) : "",
      documentsDone: BigInt(delivered.documentsDone),
      contexts: BigInt(delivered.contexts),
      exhausted: delivered.exhausted,
    },
    executionProvider: p.executionProvider,
    pausedByBuffer: s.pausedByBuffer(),
    feeds: s.feeds().map((f) => ({
      shard: f.shard,
      address: f.address,
      hookPoints: f.hookPoints,
      chunksInFlight: f.inFlight,
      pausedByBuffer: f.pausedByBuffer,
      ended: f.ended,
      contextsAllowed: BigInt(f.contextsAllowed),
      rowsSent: Object.fromEntries(Object.entries(f.rowsSent).map(([h, rows]) => [h, BigInt(rows)])),
    })),
  });
}
