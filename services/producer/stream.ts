import { create } from "@bufbuild/protobuf";
import { type ClientDuplexStream, type ServiceError, status } from "@grpc/grpc-js";
import type { TransportConfig } from "../common/config/index.js";
import { createClient, type ServiceClient } from "../common/grpc/adapter.js";
import {
  type ActivationChunk,
  BufferService,
  type PushRequest,
  PushRequestSchema,
  type PushResponse,
} from "../gen/saeflow/buffer/v1/buffer_pb.js";

export interface PushStreamOptions {
  address: string;
  transport: TransportConfig;
  /** Chunks written but not yet answered; send() waits while this many are outstanding. */
  maxInFlight: number;
  /** Each answer, in order; `response.code` != 0 means the buffer refused the chunk (not re-sent). */
  onAnswer: (chunk: ActivationChunk, response: PushResponse) => void;
  /** The stream was lost and is open again to a (possibly restarted) buffer; `resent` are the chunks written again on it. */
  onReconnected: (resent: ActivationChunk[]) => void;
  log: (line: string) => void;
}

const MIN_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5000;
/** How long one reconnect attempt waits for the channel to connect. */
const CONNECT_MS = 1000;
/** Stream statuses that re-sending cannot cure (wrong run, a contract mismatch): the producer stops. */
const PERMANENT = new Set<number>([
  status.INVALID_ARGUMENT,
  status.FAILED_PRECONDITION,
  status.UNIMPLEMENTED,
  status.PERMISSION_DENIED,
  status.UNAUTHENTICATED,
]);

/**
 * The producer's side of BufferService.Push: one bidi stream carrying every hook point's chunks.
 * The buffer answers chunks in order, so the un-answered ones are a queue; when the stream breaks
 * (buffer restart, network) it is reopened with backoff and exactly that queue is written again.
 * The buffer also de-duplicates by (producer_id, hook_point, sequence), so a chunk whose answer was
 * lost in the break is not counted twice. A reopened stream is reported even when nothing was in
 * flight: a restarted buffer has forgotten this producer, and the producer must join it again.
 */
export class PushStream {
  private readonly client: ServiceClient<typeof BufferService>;
  private readonly pending: PushRequest[] = [];
  private call: ClientDuplexStream<PushRequest, PushResponse> | undefined;
  private writable = true;
  private closing = false;
  private lostSince: number | undefined;
  private backoffMs = MIN_BACKOFF_MS;
  private retry: NodeJS.Timeout | undefined;
  private waiters: Array<() => void> = [];
  private fatal: Error | undefined;

  constructor(private readonly options: PushStreamOptions) {
    this.client = createClient(BufferService, options.address, options.transport);
    this.open();
  }

  /** Chunks sent and not yet answered. */
  get inFlight(): number {
    return this.pending.length;
  }

  /**
   * Queues `chunk` and writes it when the stream is up; resolves once it may be followed by another.
   * Rejects once the buffer has ended the stream with a status that re-sending cannot cure.
   */
  async send(chunk: ActivationChunk): Promise<void> {
    if (this.fatal) throw this.fatal;
    if (this.closing) throw new Error("push stream is closed");
    const request = create(PushRequestSchema, { chunk });
    this.pending.push(request);
    if (this.call) this.writable = this.call.write(request);
    await this.until(
      () =>
        this.closing ||
        this.fatal !== undefined ||
        (this.pending.length < this.options.maxInFlight && (this.call === undefined || this.writable)),
    );
    if (this.fatal) throw this.fatal;
  }

  /** Resolves true once every sent chunk is answered, false if `timeoutMs` passes first. */
  async flush(timeoutMs: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timedOut = new Promise<boolean>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    const done = this.until(() => this.pending.length === 0 || this.fatal !== undefined).then(() => this.pending.length === 0);
    const result = await Promise.race([done, timedOut]);
    clearTimeout(timer);
    return result;
  }

  /** Ends the stream (after flush, nothing is lost) and closes the channel; a buffer that does not close its side within `graceMs` is cut off. */
  async close(graceMs = 2000): Promise<void> {
    this.closing = true;
    clearTimeout(this.retry);
    const call = this.call;
    if (call) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => call.cancel(), graceMs);
        const done = () => {
          clearTimeout(timer);
          resolve();
        };
        call.once("status", done);
        call.once("error", done);
        call.end();
      });
    }
    this.call = undefined;
    this.notify();
    this.client.close();
  }

  private open(): void {
    const call = this.client.push();
    this.call = call;
    this.writable = true;
    call.on("data", (res: PushResponse) => this.answer(res));
    call.on("drain", () => {
      this.writable = true;
      this.notify();
    });
    call.on("error", (err: ServiceError) => {
      if (PERMANENT.has(err.code) && !this.closing) {
        this.fatal = new Error(`the buffer at ${this.options.address} refused the push stream: ${err.details || err.message}`);
        this.call = undefined;
        return this.notify();
      }
      this.lost(call, err.message);
    });
    call.on("end", () => this.lost(call, "the buffer ended the stream"));
    for (const request of this.pending) this.writable = call.write(request);
  }

  /** Waits (with backoff) until the channel connects again, then reopens the stream and re-sends. */
  private reconnect(): void {
    this.retry = setTimeout(() => {
      this.client.ready(CONNECT_MS).then(
        () => {
          if (this.closing) return;
          this.options.log(
            `push: stream to ${this.options.address} is back after ${Date.now() - this.lostSince!} ms; re-sending ${this.pending.length} chunks`,
          );
          this.lostSince = undefined;
          this.backoffMs = MIN_BACKOFF_MS;
          this.open();
          this.options.onReconnected(this.pending.map((r) => r.chunk!));
        },
        () => {
          if (this.closing) return;
          this.backoffMs = Math.min(this.backoffMs * 2, MAX_BACKOFF_MS);
          this.reconnect();
        },
      );
    }, this.backoffMs);
  }

  private lost(call: ClientDuplexStream<PushRequest, PushResponse>, why: string): void {
    if (this.call !== call) return;
    this.call = undefined;
    call.removeAllListeners("data");
    if (this.closing) return this.notify();
    this.lostSince = Date.now();
    this.options.log(`push: stream to ${this.options.address} lost (${why}); reconnecting, ${this.pending.length} chunks to re-send`);
    this.reconnect();
    this.notify();
  }

  private answer(res: PushResponse): void {
    const at = this.pending.findIndex((r) => r.chunk!.hookPoint === res.hookPoint && r.chunk!.sequence === res.sequence);
    if (at < 0) return; // an answer to a chunk answered before the stream broke
    const [request] = this.pending.splice(at, 1);
    if (res.code !== 0) this.options.log(`push: buffer refused ${res.hookPoint} #${res.sequence} (code ${res.code}): ${res.message}`);
    this.options.onAnswer(request!.chunk!, res);
    this.notify();
  }

  private until(ready: () => boolean): Promise<void> {
    if (ready()) return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (ready()) resolve();
        else this.waiters.push(check);
      };
      this.waiters.push(check);
    });
  }

  private notify(): void {
    const waiting = this.waiters;
    this.waiters = [];
    for (const w of waiting) w();
  }
}
