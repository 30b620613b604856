import type { DescMessage, DescMethod, DescService, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create, isMessage } from "@bufbuild/protobuf";
import {
  type CallOptions,
  type ClientDuplexStream,
  type ClientReadableStream,
  type ClientWritableStream,
  type handleBidiStreamingCall,
  type handleClientStreamingCall,
  type handleServerStreamingCall,
  type handleUnaryCall,
  type sendUnaryData,
  Client,
  Metadata,
  type ServerDuplexStream,
  type ServerReadableStream,
  type ServerUnaryCall,
  type ServerWritableStream,
  type ServiceDefinition,
  type ServiceError,
  status,
  type UntypedServiceImplementation,
} from "@grpc/grpc-js";
import type { EventEmitter } from "node:events";
import { context, propagation } from "@opentelemetry/api";
import type { TransportConfig } from "../config/index.js";
import { FieldError } from "../errors.js";
import type { CallGuard } from "./authorize.js";
import { channelCredentials } from "./credentials.js";
import { channelOptions } from "./options.js";
import { decodeMessage, encodeMessage } from "./wire.js";

/**
 * The one gRPC adapter: protobuf-es service descriptors to grpc-js service definitions, typed
 * handlers and typed clients. W3C trace context rides in call metadata both ways.
 */

type Kind = DescMethod["methodKind"];
interface MethodShape {
  methodKind: Kind;
  input: DescMessage;
  output: DescMessage;
}
type ShapeOf<S extends DescService> = { [K in keyof S["method"]]: S["method"][K] & MethodShape };
type In<M extends MethodShape> = MessageShape<M["input"]>;
type Out<M extends MethodShape> = MessageShape<M["output"]>;
type OutInit<M extends MethodShape> = MessageInitShape<M["output"]>;

/**
 * What a handler gets besides its input. `signal` aborts when the peer cancels, the deadline passes
 * or the call is over, so anything the handler awaits can stop with it.
 */
export interface HandlerContext {
  readonly signal: AbortSignal;
  readonly metadata: Metadata;
  /** The peer's address, for logs. */
  readonly peer: string;
}

/**
 * Server-side handler for one method, in the connect-es style: streams are async iterables both
 * ways; throw a FieldError to answer with its status. The adapter reads the next request only when
 * the handler asks for it and resumes an output iterable only once its last message was handed to
 * HTTP/2 (serialised), so a handler may reuse a message's memory after its yield returns and a
 * slow peer holds the handler back through flow control.
 */
export type Handler<M extends MethodShape> = M["methodKind"] extends "unary"
  ? (request: In<M>, ctx: HandlerContext) => Promise<OutInit<M>>
  : M["methodKind"] extends "server_streaming"
    ? (request: In<M>, ctx: HandlerContext) => AsyncIterable<OutInit<M>>
    : M["methodKind"] extends "client_streaming"
      ? (requests: AsyncIterable<In<M>>, ctx: HandlerContext) => Promise<OutInit<M>>
      : (requests: AsyncIterable<In<M>>, ctx: HandlerContext) => AsyncIterable<OutInit<M>>;

export type ServiceHandlers<S extends DescService> = { [K in keyof ShapeOf<S>]: Handler<ShapeOf<S>[K]> };

/** Client-side call for one method. */
export type ClientMethod<M extends MethodShape> = M["methodKind"] extends "unary"
  ? (request: MessageInitShape<M["input"]>, options?: CallOptions) => Promise<Out<M>>
  : M["methodKind"] extends "server_streaming"
    ? (request: MessageInitShape<M["input"]>, options?: CallOptions) => ClientReadableStream<Out<M>>
    : M["methodKind"] extends "client_streaming"
      ? (options?: CallOptions) => { stream: ClientWritableStream<In<M>>; response: Promise<Out<M>> }
      : (options?: CallOptions) => ClientDuplexStream<In<M>, Out<M>>;

export type ServiceClient<S extends DescService> = { [K in keyof ShapeOf<S>]: ClientMethod<ShapeOf<S>[K]> } & {
  /** Closes the channel. */
  close(): void;
  /** Resolves once the channel is connected, or rejects after `timeoutMs`. */
  ready(timeoutMs: number): Promise<void>;
};

const methodPath = (service: DescService, method: DescMethod): string => `/${service.typeName}/${method.name}`;

/** grpc-js ServiceDefinition for a protobuf-es service. */
export function serviceDefinition(service: DescService): ServiceDefinition {
  const def: Record<string, ServiceDefinition[string]> = {};
  for (const method of service.methods) {
    def[method.localName] = {
      path: methodPath(service, method),
      requestStream: method.methodKind === "client_streaming" || method.methodKind === "bidi_streaming",
      responseStream: method.methodKind === "server_streaming" || method.methodKind === "bidi_streaming",
      requestSerialize: (m: MessageShape<DescMessage>) => encodeMessage(method.input, m),
      requestDeserialize: (b: Buffer) => decodeMessage(method.input, b),
      responseSerialize: (m: MessageShape<DescMessage>) => encodeMessage(method.output, m),
      responseDeserialize: (b: Buffer) => decodeMessage(method.output, b),
      originalName: method.localName,
    };
  }
  return def as ServiceDefinition;
}

/** Maps anything a handler threw to a status the peer can act on, naming the field where known. */
export function toServiceError(err: unknown): Partial<ServiceError> {
  if (err instanceof FieldError) return { code: err.code, details: err.message };
  const e = err as Partial<ServiceError> | undefined;
  if (e && typeof e.code === "number" && e.code in status) return { code: e.code, details: e.details ?? e.message ?? "" };
  return { code: status.INTERNAL, details: (err as Error | undefined)?.message ?? String(err) };
}

const metadataGetter = {
  keys: (carrier: Metadata) => Object.keys(carrier.getMap()),
  get: (carrier: Metadata, key: string) => {
    const v = carrier.get(key);
    return v.length ? v.map(String) : undefined;
  },
};
const metadataSetter = { set: (carrier: Metadata, key: string, value: string) => carrier.set(key, value) };

function withCallContext<T>(metadata: Metadata, fn: () => T): T {
  return context.with(propagation.extract(context.active(), metadata, metadataGetter), fn);
}

type AnyServerCall = ServerUnaryCall<unknown, unknown> | ServerReadableStream<unknown, unknown> | ServerWritableStream<unknown, unknown>;
type OutputCall = ServerWritableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>;

/** The handler's context: its signal aborts on cancel, on the deadline, and once the call is over. */
function handlerContext(call: AnyServerCall): { ctx: HandlerContext; done: () => void } {
  const controller = new AbortController();
  const abort = (why: string) => {
    if (!controller.signal.aborted) controller.abort(new Error(why));
  };
  (call as EventEmitter).once("cancelled", () => abort("the call was cancelled"));
  const deadline = call.getDeadline();
  const ms = deadline instanceof Date ? deadline.getTime() - Date.now() : deadline - Date.now();
  // setTimeout fires at once past 2^31 - 1 ms; a deadline that far off is no deadline.
  const timer = ms < 2 ** 31 - 1 ? setTimeout(() => abort("the deadline passed"), Math.max(0, ms)) : undefined;
  return {
    ctx: { signal: controller.signal, metadata: call.metadata, peer: call.getPeer() },
    done: () => {
      clearTimeout(timer);
      abort("the call is over");
    },
  };
}

/**
 * The requests of a client or bidi stream, one at a time. Not the Readable's own `for await`: leaving
 * that loop destroys the call, and a destroyed grpc-js call never sends its status.
 */
function requestsOf(call: ServerReadableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>): AsyncIterable<unknown> {
  return { [Symbol.asyncIterator]: () => call.iterator({ destroyOnReturn: false }) };
}

/** Writes one message; resolves true once grpc-js has serialised it and handed it to HTTP/2, false if the call ended first. */
function write(call: OutputCall, message: unknown, signal: AbortSignal): Promise<boolean> {
  return new Promise((resolve) => {
    if (signal.aborted || call.destroyed) return resolve(false);
    const onAbort = () => resolve(false);
    signal.addEventListener("abort", onAbort, { once: true });
    call.write(message, () => {
      signal.removeEventListener("abort", onAbort);
      resolve(true);
    });
  });
}

/** Sends every message of `out`, then the status: OK when it ends, the error's status when it throws. */
async function pump(call: OutputCall, out: AsyncIterable<unknown>, asMessage: (v: unknown) => unknown, signal: AbortSignal): Promise<void> {
  try {
    for await (const value of out) {
      if (!(await write(call, asMessage(value), signal))) return;
    }
    if (!call.destroyed && !signal.aborted) call.end();
  } catch (err) {
    // grpc-js sends a stream's status from its own 'error' listener; destroy() would skip it and leave the peer waiting.
    if (!call.cancelled && !call.destroyed) call.emit("error", Object.assign(new Error(), toServiceError(err)) as ServiceError);
  }
}

/**
 * grpc-js implementation object for typed handlers: errors become statuses, never crashes. A guard
 * (mTLS authorization) answers a refused call before its handler runs or reads a request.
 */
export function serviceImplementation<S extends DescService>(
  service: S,
  handlers: ServiceHandlers<S>,
  guard?: CallGuard,
): UntypedServiceImplementation {
  const impl: UntypedServiceImplementation = {};
  const table = handlers as unknown as Record<string, (input: unknown, ctx: HandlerContext) => Promise<unknown> | AsyncIterable<unknown>>;
  const refused = (method: DescMethod, c: AnyServerCall) => {
    const refusal = guard?.(method, c);
    return refusal && (Object.assign(new Error(refusal.details), refusal) as ServiceError);
  };
  for (const method of service.methods) {
    const handler = table[method.localName];
    if (!handler) throw new Error(`${service.typeName}: no handler for ${method.name}`);
    const output = method.output;
    const asMessage = (value: unknown) => (isMessage(value, output) ? value : create(output, value as MessageInitShape<DescMessage>));
    const call = <T>(c: AnyServerCall, input: unknown) => {
      const { ctx, done } = handlerContext(c);
      return { result: withCallContext(c.metadata, () => handler(input, ctx)) as T, done, signal: ctx.signal };
    };
    switch (method.methodKind) {
      case "unary":
      case "client_streaming":
        impl[method.localName] = ((
          c: ServerUnaryCall<unknown, unknown> | ServerReadableStream<unknown, unknown>,
          callback: sendUnaryData<unknown>,
        ) => {
          const refusal = refused(method, c);
          if (refusal) return callback(refusal);
          const input =
            method.methodKind === "unary"
              ? (c as ServerUnaryCall<unknown, unknown>).request
              : requestsOf(c as ServerReadableStream<unknown, unknown>);
          const { result, done } = call<Promise<unknown>>(c, input);
          Promise.resolve(result)
            .then(
              (res) => callback(null, asMessage(res)),
              (err: unknown) => callback(toServiceError(err) as ServiceError),
            )
            .finally(done);
        }) satisfies handleUnaryCall<unknown, unknown> & handleClientStreamingCall<unknown, unknown>;
        break;
      case "server_streaming":
      case "bidi_streaming":
        impl[method.localName] = ((c: OutputCall) => {
          const refusal = refused(method, c);
          if (refusal) return void c.emit("error", refusal);
          const input =
            method.methodKind === "server_streaming"
              ? (c as ServerWritableStream<unknown, unknown>).request
              : requestsOf(c as ServerDuplexStream<unknown, unknown>);
          let started: { result: AsyncIterable<unknown>; done: () => void; signal: AbortSignal };
          try {
            started = call<AsyncIterable<unknown>>(c, input);
          } catch (err) {
            c.emit("error", Object.assign(new Error(), toServiceError(err)) as ServiceError);
            return;
          }
          void withCallContext(c.metadata, () => pump(c, started.result, asMessage, started.signal)).finally(started.done);
        }) satisfies handleServerStreamingCall<unknown, unknown> & handleBidiStreamingCall<unknown, unknown>;
        break;
    }
  }
  return impl;
}

/** Metadata carrying the active trace context, so the server's spans join the caller's trace. */
function tracedOptions(options: CallOptions | undefined): [Metadata, CallOptions] {
  const metadata = new Metadata();
  propagation.inject(context.active(), metadata, metadataSetter);
  return [metadata, options ?? {}];
}

/**
 * A typed client for `service` at `address` (host:port), with the transport's channel options and
 * credentials: plaintext, or TLS presenting this process's certificate (transport.tls).
 */
export function createClient<S extends DescService>(service: S, address: string, transport: TransportConfig): ServiceClient<S> {
  const def = serviceDefinition(service);
  const raw = new Client(address, channelCredentials(transport.tls), channelOptions(transport));
  const client: Record<string, unknown> = {
    close: () => raw.close(),
    ready: (timeoutMs: number) =>
      new Promise<void>((resolve, reject) => raw.waitForReady(Date.now() + timeoutMs, (err) => (err ? reject(err) : resolve()))),
  };
  for (const method of service.methods) {
    const d = def[method.localName]!;
    const make = (init: unknown) => (isMessage(init, method.input) ? init : create(method.input, init as MessageInitShape<DescMessage>));
    switch (method.methodKind) {
      case "unary":
        client[method.localName] = (request: unknown, options?: CallOptions) =>
          new Promise((resolve, reject) => {
            const [md, opts] = tracedOptions(options);
            raw.makeUnaryRequest(d.path, d.requestSerialize, d.responseDeserialize, make(request), md, opts, (err, res) =>
              err ? reject(err) : resolve(res),
            );
          });
        break;
      case "server_streaming":
        client[method.localName] = (request: unknown, options?: CallOptions) => {
          const [md, opts] = tracedOptions(options);
          return raw.makeServerStreamRequest(d.path, d.requestSerialize, d.responseDeserialize, make(request), md, opts);
        };
        break;
      case "client_streaming":
        client[method.localName] = (options?: CallOptions) => {
          const [md, opts] = tracedOptions(options);
          let stream!: ClientWritableStream<unknown>;
          const response = new Promise((resolve, reject) => {
            stream = raw.makeClientStreamRequest(d.path, d.requestSerialize, d.responseDeserialize, md, opts, (err, res) =>
              err ? reject(err) : resolve(res),
            );
          });
          return { stream, response };
        };
        break;
      case "bidi_streaming":
        client[method.localName] = (options?: CallOptions) => {
          const [md, opts] = tracedOptions(options);
          return raw.makeBidiStreamRequest(d.path, d.requestSerialize, d.responseDeserialize, md, opts);
        };
        break;
    }
  }
  return client as ServiceClient<S>;
}
