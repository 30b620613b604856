import type { DescMessage, DescMethod, DescService, MessageInitShape } from "@bufbuild/protobuf";
import { create, isMessage } from "@bufbuild/protobuf";
import {
  type handleBidiStreamingCall,
  type handleClientStreamingCall,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type Metadata,
  type sendUnaryData,
  type ServerDuplexStream,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceError,
  status,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import type { EventEmitter } from "node:events";
import { context, propagation } from "@opentelemetry/api";
import { FieldError } from "../errors.js";
import type { HandlerContext, ServiceHandlers } from "./adapter.js";
import type { CallGuard } from "./authorize.js";
import { compressionRefusal } from "./compression.js";
import { IdleWatch } from "./idle.js";
import { MAX_DETAIL_CHARS, type StreamCounts } from "./limits.js";
import { MalformedRequest } from "./malformed.js";

/**
 * The server side of the gRPC adapter: typed connect-style handlers as a grpc-js implementation.
 * Every way a call can go wrong ends in one status the peer can act on, never a crash: a request
 * that does not parse (INVALID_ARGUMENT naming the field), a refused caller, a stream past its
 * per-run limit (RESOURCE_EXHAUSTED), an idle stream (UNAVAILABLE), a handler's throw.
 */

/** What a server enforces on every call besides authorization. */
export interface ServerLimits {
  counts: StreamCounts;
  /** transport.limits.idleStreamMs */
  idleMs: number;
}

/** Maps anything a handler threw to a status the peer can act on, naming the field where known; details are cut to fit a trailer. */
export function toServiceError(err: unknown): Partial<ServiceError> {
  const cut = (details: string) => (details.length > MAX_DETAIL_CHARS ? `${details.slice(0, MAX_DETAIL_CHARS)}…` : details);
  if (err instanceof FieldError) return { code: err.code, details: cut(err.message) };
  const e = err as Partial<ServiceError> | undefined;
  if (e && typeof e.code === "number" && e.code in status) return { code: e.code, details: cut(e.details ?? e.message ?? "") };
  return { code: status.INTERNAL, details: cut((err as Error | undefined)?.message ?? String(err)) };
}

const asError = (s: Partial<ServiceError>) => Object.assign(new Error(s.details), s) as ServiceError;

const metadataGetter = {
  keys: (carrier: Metadata) => Object.keys(carrier.getMap()),
  get: (carrier: Metadata, key: string) => {
    const v = carrier.get(key);
    return v.length ? v.map(String) : undefined;
  },
};

function withCallContext<T>(metadata: Metadata, fn: () => T): T {
  return context.with(propagation.extract(context.active(), metadata, metadataGetter), fn);
}

type AnyServerCall = ServerUnaryCall<unknown, unknown> | ServerReadableStream<unknown, unknown> | ServerWritableStream<unknown, unknown>;
type OutputCall = ServerWritableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>;
type InputCall = ServerReadableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>;

/**
 * One call on the server: the handler's context (its signal aborts on cancel, on the deadline, when
 * idle and once the call is over), the idle watch of a stream, and the status, sent once.
 */
class CallState {
  readonly ctx: HandlerContext;
  readonly idle: IdleWatch | undefined;
  private readonly controller = new AbortController();
  private readonly timer: NodeJS.Timeout | undefined;
  private answered = false;

  constructor(
    call: AnyServerCall,
    streaming: boolean,
    idleMs: number | undefined,
    private readonly answer: (error: ServiceError) => void,
    private readonly release: () => void,
  ) {
    (call as EventEmitter).once("cancelled", () => this.abort("the call was cancelled"));
    const deadline = call.getDeadline();
    const ms = deadline instanceof Date ? deadline.getTime() - Date.now() : deadline - Date.now();
    // setTimeout fires at once past 2^31 - 1 ms; a deadline that far off is no deadline.
    this.timer = ms < 2 ** 31 - 1 ? setTimeout(() => this.abort("the deadline passed"), Math.max(0, ms)) : undefined;
    this.ctx = { signal: this.controller.signal, metadata: call.metadata, peer: call.getPeer() };
    if (streaming && idleMs !== undefined) {
      this.idle = new IdleWatch(idleMs, () => {
        this.fail({
          code: status.UNAVAILABLE,
          details: `stream idle: the peer sent and read nothing for ${idleMs} ms (transport.limits.idleStreamMs); open it again`,
        });
        this.abort("the stream was idle");
      });
    }
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Answers with the error's status unless the call was answered already. */
  fail(err: unknown): void {
    this.settle(() => this.answer(asError(toServiceError(err))));
  }

  /** Answers by `send` unless the call was answered already (an idle stream is answered by the watch). */
  settle(send: () => void): void {
    if (this.answered) return;
    this.answered = true;
    send();
  }

  done(): void {
    clearTimeout(this.timer);
    this.idle?.stop();
    this.release();
    this.abort("the call is over");
  }

  private abort(why: string): void {
    if (!this.controller.signal.aborted) this.controller.abort(new Error(why));
  }
}

/** Resolves with `promise`, or with undefined once `signal` aborts. */
function unlessAborted<T>(promise: Promise<T>, signal: AbortSignal): Promise<T | undefined> {
  if (signal.aborted) return Promise.resolve(undefined);
  return new Promise((resolve, reject) => {
    const onAbort = () => resolve(undefined);
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(
      (v) => {
        signal.removeEventListener("abort", onAbort);
        resolve(v);
      },
      (e: unknown) => {
        signal.removeEventListener("abort", onAbort);
        reject(e as Error);
      },
    );
  });
}

/**
 * The requests of a client or bidi stream, one at a time, each read only when the handler pulls it.
 * Not the Readable's own `for await`: leaving that loop destroys the call, and a destroyed grpc-js
 * call never sends its status. A request that did not parse throws its FieldError; an aborted call
 * (idle, cancelled, past its deadline) ends the iteration.
 */
function requestsOf(call: InputCall, state: CallState): AsyncIterable<unknown> {
  return {
    [Symbol.asyncIterator]: () => {
      const it = call.iterator({ destroyOnReturn: false });
      return {
        next: async (): Promise<IteratorResult<unknown>> => {
          const waited = state.idle?.begin();
          try {
            const r = await unlessAborted(it.next(), state.signal);
            if (!r) return { done: true, value: undefined };
            if (!r.done && r.value instanceof MalformedRequest) throw r.value.error;
            return r;
          } finally {
            waited?.();
          }
        },
        return: async (): Promise<IteratorResult<unknown>> => {
          await it.return?.();
          return { done: true, value: undefined };
        },
      };
    },
  };
}

/** Writes one message; resolves true once grpc-js has serialised it and handed it to HTTP/2, false if the call ended first. */
function write(call: OutputCall, message: unknown, state: CallState): Promise<boolean> {
  const signal = state.signal;
  return new Promise((resolve) => {
    if (signal.aborted || call.destroyed) return resolve(false);
    const waited = state.idle?.begin();
    const onAbort = () => {
      waited?.();
      resolve(false);
    };
    signal.addEventListener("abort", onAbort, { once: true });
    call.write(message, () => {
      signal.removeEventListener("abort", onAbort);
      waited?.();
      resolve(true);
    });
  });
}

/** Sends every message of `out`, then the status: OK when it ends, the error's status when it throws. */
async function pump(call: OutputCall, out: AsyncIterable<unknown>, asMessage: (v: unknown) => unknown, state: CallState): Promise<void> {
  try {
    for await (const value of out) {
      if (!(await write(call, asMessage(value), state))) return;
    }
    if (!call.destroyed && !state.signal.aborted) state.settle(() => call.end());
  } catch (err) {
    // grpc-js sends a stream's status from its own 'error' listener; destroy() would skip it and leave the peer waiting.
    if (!call.cancelled && !call.destroyed) state.fail(err);
  }
}

type Table = Record<string, (input: unknown, ctx: HandlerContext) => Promise<unknown> | AsyncIterable<unknown>>;

/** The checks before a handler runs: the guard (mTLS authorization), compression, then the per-run stream limits. */
function admit(method: DescMethod, c: AnyServerCall, guard: CallGuard | undefined, limits: ServerLimits | undefined) {
  const refusal = guard?.(method, c) ?? compressionRefusal(c.metadata);
  if (refusal) return { refusal: asError(refusal) };
  const admission = limits?.counts.admit(method) ?? { release: () => undefined };
  return "refusal" in admission ? { refusal: asError(admission.refusal) } : admission;
}

function unaryShaped(
  method: DescMethod,
  handler: Table[string],
  asMessage: (v: unknown) => unknown,
  guard?: CallGuard,
  limits?: ServerLimits,
) {
  const streaming = method.methodKind === "client_streaming";
  return ((c: ServerUnaryCall<unknown, unknown> | ServerReadableStream<unknown, unknown>, callback: sendUnaryData<unknown>) => {
    const admitted = admit(method, c, guard, limits);
    if ("refusal" in admitted) return callback(admitted.refusal);
    const state = new CallState(c, streaming, limits?.idleMs, (e) => callback(e), admitted.release);
    const request = streaming
      ? requestsOf(c as ServerReadableStream<unknown, unknown>, state)
      : (c as ServerUnaryCall<unknown, unknown>).request;
    if (request instanceof MalformedRequest) {
      state.fail(request.error);
      return state.done();
    }
    Promise.resolve()
      .then(() => withCallContext(c.metadata, () => handler(request, state.ctx)))
      .then(
        (res) => {
          let message: unknown;
          try {
            message = asMessage(res);
          } catch (err) {
            return state.fail(err);
          }
          state.settle(() => callback(null, message));
        },
        (err: unknown) => state.fail(err),
      )
      .finally(() => state.done());
  }) satisfies handleUnaryCall<unknown, unknown> & handleClientStreamingCall<unknown, unknown>;
}

function streamShaped(
  method: DescMethod,
  handler: Table[string],
  asMessage: (v: unknown) => unknown,
  guard?: CallGuard,
  limits?: ServerLimits,
) {
  return ((c: OutputCall) => {
    const admitted = admit(method, c, guard, limits);
    if ("refusal" in admitted) return void c.emit("error", admitted.refusal);
    const state = new CallState(c, true, limits?.idleMs, (e) => c.emit("error", e), admitted.release);
    const request =
      method.methodKind === "server_streaming" ? (c as ServerWritableStream<unknown, unknown>).request : requestsOf(c as InputCall, state);
    if (request instanceof MalformedRequest) {
      state.fail(request.error);
      return state.done();
    }
    let result: AsyncIterable<unknown>;
    try {
      result = withCallContext(c.metadata, () => handler(request, state.ctx)) as AsyncIterable<unknown>;
    } catch (err) {
      state.fail(err);
      return state.done();
    }
    void withCallContext(c.metadata, () => pump(c, result, asMessage, state)).finally(() => state.done());
  }) satisfies handleServerStreamingCall<unknown, unknown> & handleBidiStreamingCall<unknown, unknown>;
}

/**
 * grpc-js implementation object for typed handlers: errors become statuses, never crashes. A guard
 * (mTLS authorization) and the stream limits answer a refused call before its handler runs or reads
 * a request.
 */
export function serviceImplementation<S extends DescService>(
  service: S,
  handlers: ServiceHandlers<S>,
  guard?: CallGuard,
  limits?: ServerLimits,
): UntypedServiceImplementation {
  const impl: UntypedServiceImplementation = {};
  const table = handlers as unknown as Table;
  for (const method of service.methods) {
    const handler = table[method.localName];
    if (!handler) throw new Error(`${service.typeName}: no handler for ${method.name}`);
    const output = method.output;
    const asMessage = (value: unknown) => (isMessage(value, output) ? value : create(output, value as MessageInitShape<DescMessage>));
    const unary = method.methodKind === "unary" || method.methodKind === "client_streaming";
    impl[method.localName] = unary
      ? unaryShaped(method, handler, asMessage, guard, limits)
      : streamShaped(method, handler, asMessage, guard, limits);
  }
  return impl;
}
