import type { DescService } from "@bufbuild/protobuf";
import { Server, ServerCredentials } from "@grpc/grpc-js";
import type { Http2SecureServer, Http2Server, ServerHttp2Session } from "node:http2";
import type { TransportConfig } from "../config/index.js";
import { Health } from "../../gen/grpc/health/v1/health_pb.js";
import { type ServerLimits, type ServiceHandlers, serviceDefinition, serviceImplementation } from "./adapter.js";
import { type CallGuard, mtlsGuard, PeerVerdicts } from "./authorize.js";
import { serverCredentials } from "./credentials.js";
import { refuseCompression } from "./compression.js";
import { HealthState } from "./health.js";
import { StreamCounts } from "./limits.js";
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
  /** host:port of the plaintext health-only listener (transport.tls.healthAddress), when there is one. */
  healthAddress?: string;
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

/** http2 servers grpc-js made for `server`, to reach what grpc-js has no option for. */
function http2Servers(server: Server): Array<Http2Server | Http2SecureServer> {
  const internals = server as unknown as { http2Servers?: Map<Http2Server | Http2SecureServer, unknown> };
  return [...(internals.http2Servers?.keys() ?? [])];
}

function widenSessions(server: Server, bytes: number): void {
  for (const http2 of http2Servers(server)) {
    http2.on("session", (session: ServerHttp2Session) => {
      try {
        session.setLocalWindowSize(Math.min(bytes, 2 ** 31 - 1));
      } catch {
        // A session that closed before this ran needs no window.
      }
    });
  }
}

const bindTo = (server: Server, address: string, credentials: ServerCredentials) =>
  new Promise<number>((resolve, reject) => server.bindAsync(address, credentials, (err, p) => (err ? reject(err) : resolve(p))));

const hostOf = (address: string) => address.slice(0, address.lastIndexOf(":"));

function shutdown(server: Server, graceMs: number): Promise<void> {
  return new Promise<void>((resolve) => {
    const timer = setTimeout(() => server.forceShutdown(), graceMs);
    server.tryShutdown(() => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * Kubernetes' gRPC probes cannot speak TLS: under TLS they ask this plaintext listener, which
 * serves grpc.health.v1 alone, the same statuses as the main port and nothing a stranger can act on.
 */
async function startPlainHealth(
  address: string,
  transport: TransportConfig,
  health: HealthState,
): Promise<{ server: Server; address: string }> {
  const server = new Server(serverOptions(transport));
  const limits: ServerLimits = { counts: new StreamCounts(transport.limits), idleMs: transport.limits.idleStreamMs };
  server.addService(serviceDefinition(Health), serviceImplementation(Health, health.handlers(), undefined, limits));
  const port = await bindTo(server, address, ServerCredentials.createInsecure());
  for (const http2 of http2Servers(server)) refuseCompression(http2);
  return { server, address: `${hostOf(address)}:${port}` };
}

/**
 * Starts a gRPC server with the given services, health and reflection, on `address` (host:port),
 * plaintext or under TLS (transport.tls); under mTLS every call is authorized by the caller's
 * certificate before its handler runs (authorize.ts). Every call is held to transport.limits:
 * streams per connection, producers and trainers per run, idle streams.
 */
export async function startServer(address: string, transport: TransportConfig, bindings: ServiceBinding[]): Promise<RunningServer> {
  const tls = transport.tls;
  const credentials = serverCredentials(tls);
  const server = new Server(serverOptions(transport));
  widenWindows(server, transport.flowControlWindowBytes);
  const verdicts = new PeerVerdicts();
  const guard: CallGuard | undefined = tls.mode === "mtls" ? mtlsGuard(tls, verdicts) : undefined;
  const health = new HealthState(bindings.map((b) => b.service.typeName));
  const limits: ServerLimits = { counts: new StreamCounts(transport.limits), idleMs: transport.limits.idleStreamMs };
  for (const b of [...bindings, bind(Health, health.handlers())]) {
    server.addService(serviceDefinition(b.service), serviceImplementation(b.service, b.handlers, guard, limits));
  }
  addReflection(server, [...bindings.map((b) => b.service.typeName), Health.typeName], guard, limits);
  const port = await bindTo(server, address, credentials);
  widenSessions(server, transport.flowControlWindowBytes);
  for (const http2 of http2Servers(server)) refuseCompression(http2);
  if (guard) for (const http2 of http2Servers(server)) verdicts.watch(http2 as Http2SecureServer);
  const plain =
    tls.mode !== "off" && tls.healthAddress
      ? await startPlainHealth(tls.healthAddress, transport, health).catch(async (err: unknown) => {
          server.forceShutdown();
          throw err;
        })
      : undefined;
  return {
    address: `${hostOf(address)}:${port}`,
    port,
    ...(plain ? { healthAddress: plain.address } : {}),
    health,
    close: async (graceMs = 2000) => {
      health.close();
      await Promise.all([shutdown(server, graceMs), plain && shutdown(plain.server, graceMs)]);
    },
  };
}
