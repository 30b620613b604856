import type { DescMethod } from "@bufbuild/protobuf";
import { type ServerUnaryCall, type ServiceError, status } from "@grpc/grpc-js";
import type { PeerCertificate, Server as TlsServer, TLSSocket } from "node:tls";
import type { GrpcTlsConfig } from "../config/index.js";

/**
 * Authorization by role under mTLS. A caller is who its client certificate says (subject CN and
 * every subjectAltName value); what it may call is fixed by the method, and who holds each
 * permission is configured under transport.tls.
 */

type ListKey = "producers" | "trainers" | "operators" | "statusReaders";
/** "peers": any caller with a valid certificate (health, reflection). */
type Rule = ListKey | "peers";

/** Methods by name on any saeflow service; a method not named here needs an operator, so a new RPC starts closed. */
const BY_METHOD: Record<string, ListKey> = {
  Push: "producers",
  Batches: "trainers",
  Status: "statusReaders",
};
const OPEN_SERVICES = ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

export const ruleFor = (method: DescMethod): Rule =>
  OPEN_SERVICES.includes(method.parent.typeName) ? "peers" : (BY_METHOD[method.name] ?? "operators");

/** The names a certificate answers to: its subject CN, then each subjectAltName value without its type. */
export function identitiesOf(cert: PeerCertificate): string[] {
  const cn = (cert.subject as unknown as Record<string, string | string[] | undefined> | undefined)?.CN;
  const names = cn === undefined ? [] : Array.isArray(cn) ? cn : [cn];
  for (const entry of (cert.subjectaltname ?? "").split(/, (?=[A-Za-z ]+:)/)) {
    const colon = entry.indexOf(":");
    if (colon > 0) names.push(entry.slice(colon + 1).replace(/^"(.*)"$/, "$1"));
  }
  return names;
}

/** OpenSSL's verdict on a client certificate in words; node hands over its code as a string despite its Error type. */
function refusal(error: Error | string | undefined): string {
  const code = typeof error === "string" ? error : (error?.message ?? "");
  if (code === "CERT_HAS_EXPIRED") return "has expired";
  if (code === "CERT_NOT_YET_VALID") return "is not valid yet";
  if (/ISSUER|LEAF_SIGNATURE|SELF_SIGNED|CERT_SIGNATURE_FAILURE/.test(code)) return `is not signed by this server's CA (${code})`;
  return `was not accepted (${code || "unverified"})`;
}

/**
 * Why each TLS connection's client certificate was not accepted, by peer address: the handshake
 * lets such a connection through so that its calls can be answered UNAUTHENTICATED with the reason.
 */
export class PeerVerdicts {
  private readonly reasons = new Map<string, string>();

  watch(server: TlsServer): void {
    server.on("secureConnection", (socket: TLSSocket) => {
      if (socket.authorized) return;
      const peer = `${socket.remoteAddress}:${socket.remotePort}`;
      const presented = Object.keys(socket.getPeerCertificate()).length > 0;
      this.reasons.set(
        peer,
        presented ? `its client certificate ${refusal(socket.authorizationError)}` : "it presented no client certificate",
      );
      socket.once("close", () => this.reasons.delete(peer));
    });
  }

  reason(peer: string): string {
    return this.reasons.get(peer) ?? "it presented no valid client certificate";
  }
}

/** What a guard needs of a call: grpc-js server calls have both. */
export type GuardedCall = Pick<ServerUnaryCall<unknown, unknown>, "getAuthContext" | "getPeer">;

/** Decides before a handler runs; a refusal is the status the caller gets. */
export type CallGuard = (method: DescMethod, call: GuardedCall) => Partial<ServiceError> | undefined;

/** The guard of an mTLS server: UNAUTHENTICATED without a valid certificate, PERMISSION_DENIED for the wrong role. */
export function mtlsGuard(tls: GrpcTlsConfig, verdicts: PeerVerdicts): CallGuard {
  return (method, call) => {
    const rpc = `${method.parent.typeName}/${method.name}`;
    const cert = call.getAuthContext().sslPeerCertificate;
    if (!cert) {
      return {
        code: status.UNAUTHENTICATED,
        details: `${rpc} refused: ${verdicts.reason(call.getPeer())}; this server requires a valid client certificate (transport.tls.mode is mtls)`,
      };
    }
    const rule = ruleFor(method);
    if (rule === "peers") return undefined;
    const allowed = tls[rule];
    const names = identitiesOf(cert);
    if (allowed.includes("*") || names.some((n) => allowed.includes(n))) return undefined;
    return {
      code: status.PERMISSION_DENIED,
      details: `${rpc} refused to ${names[0] ?? "a certificate without a name"}: only transport.tls.${rule} (${allowed.join(", ")}) may call it`,
    };
  };
}
