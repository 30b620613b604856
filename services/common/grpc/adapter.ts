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
  Client,
  credentials,
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
import { context, propagation } from "@opentelemetry/api";
import type { TransportConfig } from "../config/index.js";
import { FieldError } from "../errors.js";
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

/** Server-side handler for one method; throw a FieldError to answer with its status. */
export type Handler<M extends MethodShape> = M["methodKind"] extends "unary"
  ? (request: In<M>, call: ServerUnaryCall<In<M>, Out<M>>) => Promise<OutInit<M>>
  : M["methodKind"] extends "server_streaming"
    ? (request: In<M>, call: ServerWritableStream<In<M>, Out<M>>) => Promise<void>
    : M["methodKind"] extends "client_streaming"
      ? (call: ServerReadableStream<In<M>, Out<M>>) => Promise<OutInit<M>>
      : (call: ServerDuplexStream<In<M>, Out<M>>) => Promise<void>;

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

/**
 * `for await` over a Readable destroys it when the loop ends, and a destroyed grpc-js server stream
 * never sends its status: the peer would wait forever. Iterate without destroying instead.
 */
function keepOpenAfterIteration(call: ServerReadableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>): void {
  call[Symbol.asyncIterator] = () => call.iterator({ destroyOnReturn: false });
}

/** grpc-js implementation object for typed handlers: errors become statuses, never crashes. */
export function serviceImplementation<S extends DescService>(service: S, handlers: ServiceHandlers<S>): UntypedServiceImplementation {
  const impl: UntypedServiceImplementation = {};
  const table = handlers as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
  for (const method of service.methods) {
    const handler = table[method.localName];
    if (!handler) throw new Error(`${service.typeName}: no handler for ${method.name}`);
    const output = method.output;
    const asMessage = (value: unknown) => (isMessage(value, output) ? value : create(output, value as MessageInitShape<DescMessage>));
    switch (method.methodKind) {
      case "unary":
        impl[method.localName] = ((call, callback) => {
          withCallContext(call.metadata, () => handler(call.request, call)).then(
            (res) => callback(null, asMessage(res)),
            (err: unknown) => callback(toServiceError(err) as ServiceError),
          );
        }) satisfies handleUnaryCall<unknown, unknown>;
        break;
      case "client_streaming":
        impl[method.localName] = ((call, callback) => {
          keepOpenAfterIteration(call);
          withCallContext(call.metadata, () => handler(call)).then(
            (res) => callback(null, asMessage(res)),
            (err: unknown) => callback(toServiceError(err) as ServiceError),
          );
        }) satisfies handleClientStreamingCall<unknown, unknown>;
        break;
      case "server_streaming":
      case "bidi_streaming":
        impl[method.localName] = ((call: ServerWritableStream<unknown, unknown> | ServerDuplexStream<unknown, unknown>) => {
          const bidi = method.methodKind === "bidi_streaming";
          if (bidi) keepOpenAfterIteration(call as ServerDuplexStream<unknown, unknown>);
          const args = bidi ? [call] : [(call as ServerWritableStream<unknown, unknown>).request, call];
          withCallContext(call.metadata, () => handler(...args)).then(
            () => {
              if (!call.destroyed) call.end();
            },
            (err: unknown) => {
              // grpc-js sends a stream's status from its own 'error' listener; destroy() would skip it and leave the peer waiting.
              if (!call.cancelled && !call.destroyed) call.emit("error", Object.assign(new Error(), toServiceError(err)) as ServiceError);
            },
          );
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

/** A typed client for `service` at `address` (host:port), with the transport's channel options. */
export function createClient<S extends DescService>(service: S, address: string, transport: TransportConfig): ServiceClient<S> {
  const def = serviceDefinition(service);
  const raw = new Client(address, credentials.createInsecure(), channelOptions(transport));
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
