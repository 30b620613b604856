import { create } from "@bufbuild/protobuf";
import { type ClientDuplexStream, type ServiceError, status } from "@grpc/grpc-js";
import type { TransportConfig } from "../common/config/index.js";
import { createClient, type ServiceClient } from "../common/grpc/adapter.js";
import { RECONNECT_MAX_MS } from "../common/grpc/options.js";
import { Signal } from "../common/signal.js";
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
  /**
   * The stream is about to be opened again with `resent` to write first: the producer joins the
   * shard again (a hello) before they go, so that the buffer counts them in the grant that hello starts, as the producer does.
   */
  onReconnected: (resent: ActivationChunk[]) => Promise<void>;
  log: (line: string) => void;
}

const MIN_BACKOFF_MS = 100;
/** How long one reconnect attempt waits for the channel to connect. */
const CONNECT_MS = 1000;
/** How long drain() lets the buffer close its side of the stream before cutting it. */
const END_GRACE_MS = 2000;
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
  private readonly changed = new Signal();
  private fatal: Error | undefined;
  private draining: Promise<boolean> | undefined;
  private readonly saidRefused = new Set<string>();

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
    if (this.closing || this.draining) throw new Error("push stream is closed");
    const request = create(PushRequestSchema, { chunk });
    this.pending.push(request);
    if (this.call) this.writable = this.call.write(request);
    await this.changed.until(
      () =>
        this.closing ||
        this.fatal !== undefined ||
        (this.pending.length < this.options.maxInFlight && (this.call === undefined || this.writable)),
    );
    if (this.fatal) throw this.fatal;
  }

  /**
   * Stops taking chunks, waits up to `timeoutMs` for the buffer to answer every chunk sent, then ends
   * the stream and closes the channel. Resolves true when every chunk was answered (nothing is lost).
   */
  drain(timeoutMs: number): Promise<boolean> {
    return (this.draining ??= (async () => {
      await this.changed.until(() => this.pending.length === 0 || this.fatal !== undefined, AbortSignal.timeout(timeoutMs));
      const answered = this.pending.length === 0;
      this.closing = true;
      clearTimeout(this.retry);
      await this.end(END_GRACE_MS);
      this.client.close();
      return answered;
    })());
  }

  /** Cuts the stream and closes the channel at once; chunks not yet answered stay unanswered. */
  async close(): Promise<void> {
    this.closing = true;
    clearTimeout(this.retry);
    this.call?.cancel();
    this.call = undefined;
    this.changed.notify();
    this.client.close();
  }

  /** Ends the stream and waits for the buffer's status; a buffer that does not close its side within `graceMs` is cut off. */
  private async end(graceMs: number): Promise<void> {
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
    this.changed.notify();
  }

  private open(): void {
    const call = this.client.push();
    this.call = call;
    this.writable = true;
    call.on("data", (res: PushResponse) => this.answer(res));
    call.on("drain", () => {
      this.writable = true;
      this.changed.notify();
    });
    call.on("error", (err: ServiceError) => {
      if (PERMANENT.has(err.code) && !this.closing) {
        this.fatal = new Error(`the buffer at ${this.options.address} refused the push stream: ${err.details || err.message}`);
        this.call = undefined;
        return this.changed.notify();
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
          // Re-sent rows reaching the buffer before the hello would count in the grant the hello replaces.
          void this.options.onReconnected(this.pending.map((r) => r.chunk!)).then(() => {
            if (!this.closing) this.open();
          });
        },
        () => {
          if (this.closing) return;
          this.backoffMs = Math.min(this.backoffMs * 2, RECONNECT_MAX_MS);
          this.reconnect();
        },
      );
    }, this.backoffMs);
  }

  private lost(call: ClientDuplexStream<PushRequest, PushResponse>, why: string): void {
    if (this.call !== call) return;
    this.call = undefined;
    call.removeAllListeners("data");
    if (this.closing) return this.changed.notify();
    this.lostSince = Date.now();
    this.options.log(`push: stream to ${this.options.address} lost (${why}); reconnecting, ${this.pending.length} chunks to re-send`);
    this.reconnect();
    this.changed.notify();
  }

  /**
   * Logs a refusal. A pool whose trainers are done refuses every chunk of the passes that go on
   * feeding the other pools (FAILED_PRECONDITION, the shard draining too): said once per hook point.
   */
  private refused(res: PushResponse): void {
    const key = `${res.hookPoint}\0${res.code}`;
    if (res.code === status.FAILED_PRECONDITION && this.saidRefused.has(key)) return;
    this.saidRefused.add(key);
    const more = res.code === status.FAILED_PRECONDITION ? "; later refusals of it for the same reason are not logged" : "";
    this.options.log(`push: buffer refused ${res.hookPoint} #${res.sequence} (code ${res.code}): ${res.message}${more}`);
  }

  private answer(res: PushResponse): void {
    const at = this.pending.findIndex((r) => r.chunk!.hookPoint === res.hookPoint && r.chunk!.sequence === res.sequence);
    if (at < 0) return; // an answer to a chunk answered before the stream broke
    const [request] = this.pending.splice(at, 1);
    if (res.code !== 0) this.refused(res);
    this.options.onAnswer(request!.chunk!, res);
    this.changed.notify();
  }
}
