import type { DescMessage, DescMethod, DescService, MessageInitShape, MessageShape } from "@bufbuild/protobuf";
import { create, isMessage } from "@bufbuild/protobuf";
import {
  type CallOptions,
  type ClientDuplexStream,
  type ClientReadableStream,
  type ClientWritableStream,
  Client,
  Metadata,
  type ServiceDefinition,
} from "@grpc/grpc-js";
import { context, propagation } from "@opentelemetry/api";
import type { TransportConfig } from "../config/index.js";
import { channelCredentials } from "./credentials.js";
import { channelOptions } from "./options.js";
import { decodeRequest } from "./malformed.js";
import { decodeMessage, encodeMessage } from "./wire.js";

export { serviceImplementation, type ServerLimits, toServiceError } from "./implementation.js";

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
      // A request that does not parse reaches the handler's adapter as a MalformedRequest naming the field.
      requestDeserialize: (b: Buffer) => decodeRequest(method.input, b, () => decodeMessage(method.input, b)),
      responseSerialize: (m: MessageShape<DescMessage>) => encodeMessage(method.output, m),
      responseDeserialize: (b: Buffer) => decodeMessage(method.output, b),
      originalName: method.localName,
    };
  }
  return def as ServiceDefinition;
}

const metadataSetter = { set: (carrier: Metadata, key: string, value: string) => carrier.set(key, value) };

/** Metadata carrying the active trace context, so the server's spans join the caller's trace. */
function tracedOptions(options: CallOptions | undefined): [Metadata, CallOptions] {
  const metadata = new Metadata();
  propagation.inject(context.active(), metadata, metadataSetter);
  return [metadata, options ?? {}];
}

/** A unary call's options with a deadline: the caller's, or transport.limits.callDeadlineMs from now. */
function withDeadline(options: CallOptions, ms: number): CallOptions {
  return options.deadline === undefined ? { ...options, deadline: Date.now() + ms } : options;
}

/**
 * A typed client for `service` at `address` (host:port), with the transport's channel options and
 * credentials: plaintext, or TLS presenting this process's certificate (transport.tls). Every unary
 * call carries a deadline, the caller's or transport.limits.callDeadlineMs.
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
            const timed = withDeadline(opts, transport.limits.callDeadlineMs);
            raw.makeUnaryRequest(d.path, d.requestSerialize, d.responseDeserialize, make(request), md, timed, (err, res) =>
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
