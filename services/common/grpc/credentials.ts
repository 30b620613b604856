import { type ChannelCredentials, credentials, experimental, ServerCredentials } from "@grpc/grpc-js";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { rootCertificates } from "node:tls";
import type { GrpcTlsConfig } from "../config/index.js";
import { ConfigError } from "../config/error.js";

type CaListener = experimental.CaCertificateUpdateListener;
type IdentityListener = experimental.IdentityCertificateUpdateListener;
interface Pem {
  ca: Buffer;
  identity: { certificate: Buffer; privateKey: Buffer } | null;
}

function readKey(tls: GrpcTlsConfig, key: "cert" | "key" | "ca"): Buffer {
  try {
    return readFileSync(tls[key]);
  } catch (err) {
    throw ConfigError.at(`transport.tls.${key}`, `cannot read ${tls[key]}: ${(err as Error).message}`);
  }
}

function parseCertificate(tls: GrpcTlsConfig, key: "cert" | "ca", pem: Buffer): X509Certificate {
  try {
    return new X509Certificate(pem);
  } catch (err) {
    throw ConfigError.at(`transport.tls.${key}`, `${tls[key]} holds no PEM certificate: ${(err as Error).message}`);
  }
}

/** Reads and checks the files once: a missing file or a key that is not the certificate's fails naming the key. */
function readPem(tls: GrpcTlsConfig): Pem {
  let ca: Buffer = Buffer.from(rootCertificates.join("\n"));
  if (tls.ca) {
    ca = readKey(tls, "ca");
    parseCertificate(tls, "ca", ca);
  }
  if (!tls.cert && !tls.key) return { ca, identity: null };
  const certificate = readKey(tls, "cert");
  const privateKey = readKey(tls, "key");
  const x509 = parseCertificate(tls, "cert", certificate);
  let matches: boolean;
  try {
    matches = x509.checkPrivateKey(createPrivateKey(privateKey));
  } catch (err) {
    throw ConfigError.at("transport.tls.key", `${tls.key} holds no PEM private key: ${(err as Error).message}`);
  }
  if (!matches) throw ConfigError.at("transport.tls.key", `${tls.key} is not the private key of ${tls.cert}`);
  return { ca, identity: { certificate, privateKey } };
}

const samePem = (a: Pem, b: Pem): boolean =>
  a.ca.equals(b.ca) &&
  (a.identity === null || b.identity === null
    ? a.identity === b.identity
    : a.identity.certificate.equals(b.identity.certificate) && a.identity.privateKey.equals(b.identity.privateKey));

/**
 * The certificate files of transport.tls as a grpc-js certificate provider: read and checked at
 * once, then re-read every reloadMs while a server or channel uses them, so a renewed Kubernetes
 * Secret (cert-manager rotates them in place) takes effect on new connections without a restart.
 * A file caught half-written keeps the previous certificates until the next read.
 */
class PemFiles implements experimental.CertificateProvider {
  private pem: Pem;
  private readonly caListeners = new Set<CaListener>();
  private readonly identityListeners = new Set<IdentityListener>();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly tls: GrpcTlsConfig) {
    this.pem = readPem(tls);
  }

  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener);
    this.watch();
    // grpc-js registers its own watcher only after adding this listener: answer on the next tick.
    process.nextTick(listener, { caCertificate: this.pem.ca });
  }

  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener);
    this.watch();
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener);
    this.watch();
    process.nextTick(listener, this.pem.identity);
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener);
    this.watch();
  }

  private watch(): void {
    const used = this.caListeners.size + this.identityListeners.size > 0;
    if (used && !this.timer && this.tls.reloadMs > 0) {
      this.timer = setInterval(() => this.reload(), this.tls.reloadMs);
      this.timer.unref();
    } else if (!used && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  private reload(): void {
    let next: Pem;
    try {
      next = readPem(this.tls);
    } catch {
      return;
    }
    if (samePem(next, this.pem)) return;
    this.pem = next;
    for (const l of this.caListeners) l({ caCertificate: next.ca });
    for (const l of this.identityListeners) l(next.identity);
  }
}

/**
 * Server credentials for transport.tls. Under tls and mtls alike the server asks for a client
 * certificate without rejecting the handshake when it is missing or invalid: the call is then
 * refused with UNAUTHENTICATED naming why (authorize.ts), which a TLS alert could not say.
 */
export function serverCredentials(tls: GrpcTlsConfig): ServerCredentials {
  if (tls.mode === "off") return ServerCredentials.createInsecure();
  const files = new PemFiles(tls);
  // One provider for both roles: grpc-js 1.14 declares (ca, identity) but constructs (identity, ca).
  return experimental.createCertificateProviderServerCredentials(files, files, false);
}

/** Channel credentials for transport.tls: the server verified against ca, this process's certificate presented when it has one. */
export function channelCredentials(tls: GrpcTlsConfig): ChannelCredentials {
  if (tls.mode === "off") return credentials.createInsecure();
  const files = new PemFiles(tls);
  return experimental.createCertificateProviderChannelCredentials(files, tls.cert ? files : null);
}
