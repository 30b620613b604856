import type { DescService } from "@bufbuild/protobuf";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import type { Http2Server, ServerHttp2Session } from "node:http2";
import type { TransportConfig } from "../config/index.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { type ServiceHandlers, serviceDefinition, serviceImplementation } from "./adapter.js";
import { HealthState } from "./health.js";
import { serverOptions } from "./options.js";
import { addReflection } from "./reflection.js";

export interface ServiceBinding<S extends DescService = DescService> {
  service: S;
  handlers: ServiceHandlers<S>;
}

/** Pairs a service with its handlers, checking the handler table against the descriptor. */
export function bind<S extends DescService>(service: S, handlers: ServiceHandlers<S>): ServiceBinding {
  return { service, handlers } as unknown as ServiceBinding;
}

export interface RunningServer {
  /** host:port actually bound (port 0 picks a free one). */
  address: string;
  port: number;
  health: HealthState;
  /** Stops accepting calls, waits up to `graceMs` for calls in flight, then cancels the rest. */
  close(graceMs?: number): Promise<void>;
}

/**
 * grpc-js has no server option for HTTP/2 windows; its receive window stays at 64 KiB, holding a
 * producer's push stream to ~0.3 GB/s. Raise the stream window through the HTTP/2 settings grpc-js
 * passes to node:http2, and the connection window on each new session.
 */
function widenWindows(server: Server, bytes: number): void {
  const internals = server as unknown as { commonServerOptions?: { settings?: { initialWindowSize?: number } } };
  if (internals.commonServerOptions) {
    internals.commonServerOptions.settings = { ...internals.commonServerOptions.settings, initialWindowSize: Math.min(bytes, 2 ** 31 - 1) };
  }
}

function widenSessions(server: Server, bytes: number): void {
  const internals = server as unknown as { http2Servers?: Map<Http2Server, unknown> };
  for (const http2 of internals.http2Servers?.keys() ?? []) {
    http2.on("session", (session: ServerHttp2Session) => {
      try {
        session.setLocalWindowSize(Math.min(bytes, 2 ** 31 - 1));
      } catch {
        // A session that closed before this ran needs no window.
      }
    });
  }
}

/** Starts a gRPC server with the given services, health and reflection, on `address` (host:port). */
export async function startServer(address: string, transport: TransportConfig, bindings: ServiceBinding[]): Promise<RunningServer> {
  const server = new Server(serverOptions(transport));
  widenWindows(server, transport.flowControlWindowBytes);
  const health = new HealthState(bindings.map((b) => b.service.typeName));
  for (const b of [...bindings, bind(Health, health.handlers())]) {
    server.addService(serviceDefinition(b.service), serviceImplementation(b.service, b.handlers));
  }
  addReflection(server, [...bindings.map((b) => b.service.typeName), Health.typeName]);
  const port = await new Promise<number>((resolve, reject) =>
    server.bindAsync(address, ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
  );
  widenSessions(server, transport.flowControlWindowBytes);
  const host = address.slice(0, address.lastIndexOf(":"));
  return {
    address: `${host}:${port}`,
    port,
    health,
    close: (graceMs = 2000) =>
      new Promise<void>((resolve) => {
        health.close();
        const timer = setTimeout(() => server.forceShutdown(), graceMs);
        server.tryShutdown(() => {
          clearTimeout(timer);
          resolve();
        });
      }),
  };
}
