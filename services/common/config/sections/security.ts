import { z } from "zod";

/**
 * Who may reach a run: TLS and mTLS on gRPC with authorization by role, credentials and TLS for
 * NATS. Every key is the same for every role: in Kubernetes each role's pod mounts its own Secret at
 * the same path; `saeflow up --tls` passes each process its own paths with --set.
 */

/** A certificate identity: its subject CN or one of its subjectAltName values; "*" is any valid certificate. */
const identities = z.array(z.string().min(1)).min(1);

export const GrpcTlsSection = z
  .object({
    mode: z
      .enum(["off", "tls", "mtls"])
      .default("off")
      .describe(
        "off: plaintext gRPC (the local default). tls: every server presents cert and clients verify it against ca. " +
          "mtls: servers also ask each client for a certificate signed by ca and authorize every call by its identity.",
      ),
    cert: z.string().default("").describe("PEM certificate of this process: its server certificate and, under mtls, its client identity."),
    key: z.string().default("").describe("PEM private key of cert."),
    ca: z
      .string()
      .default("")
      .describe("PEM CA bundle peers are verified against; required for mtls; empty (tls only) trusts the system CAs."),
    serverName: z
      .string()
      .default("")
      .describe("Name clients expect in servers' certificates; empty checks the host of the address dialled."),
    healthAddress: z
      .string()
      .default("")
      .describe(
        "host:port of a plaintext listener serving only grpc.health.v1 while TLS is on, for Kubernetes' gRPC probes " +
          "(which cannot speak TLS); empty serves none.",
      ),
    reloadMs: z
      .number()
      .int()
      .min(0)
      .default(60000)
      .describe("How often servers re-read cert, key and ca so a renewed Secret takes effect without a restart; 0 never."),
    producers: identities.default(["saeflow-producer"]).describe("Identities (certificate CN or SAN) that may Push rows into a buffer."),
    trainers: identities.default(["saeflow-trainer"]).describe("Identities that may open Batches from a buffer."),
    operators: identities
      .default(["saeflow-operator"])
      .describe("Identities that may call Pause, Resume, Drain, Stop and Checkpoint (and any RPC not named elsewhere)."),
    statusReaders: identities.default(["*"]).describe('Identities that may call Status; "*" is any peer with a valid certificate.'),
  })
  .strict()
  .superRefine((t, ctx) => {
    if (t.mode === "off") return;
    for (const key of ["cert", "key"] as const) {
      if (!t[key]) ctx.addIssue({ code: "custom", path: [key], message: `required when transport.tls.mode is ${t.mode}` });
    }
    if (t.mode === "mtls" && !t.ca) {
      ctx.addIssue({
        code: "custom",
        path: ["ca"],
        message: "required when transport.tls.mode is mtls: client certificates are checked against it",
      });
    }
  });

/** TLS to the NATS server. */
export const NatsTlsSection = z
  .object({
    ca: z.string().default("").describe("PEM CA bundle the NATS server is verified against; setting any key here turns TLS on."),
    cert: z.string().default("").describe("PEM client certificate, for a NATS server that verifies clients."),
    key: z.string().default("").describe("PEM private key of cert."),
  })
  .strict()
  .superRefine((t, ctx) => {
    if (Boolean(t.cert) !== Boolean(t.key)) {
      ctx.addIssue({ code: "custom", path: [t.cert ? "key" : "cert"], message: "cert and key go together" });
    }
  });

/**
 * Credentials for the NATS server: at most one way of user/password, token, credsFile and nkeyFile.
 * In Kubernetes prefer the *File keys over env vars: a Secret mounted as a file never shows up in
 * the pod spec or a process listing.
 */
export const natsCredentials = {
  user: z.string().default("").describe("NATS user, with password or passwordFile."),
  password: z.string().default("").describe("NATS password of user."),
  passwordFile: z.string().default("").describe("File holding the password of user (a mounted Secret)."),
  token: z.string().default("").describe("NATS token."),
  tokenFile: z.string().default("").describe("File holding the NATS token (a mounted Secret)."),
  credsFile: z.string().default("").describe("NATS .creds file (user JWT and nkey seed) for decentralized auth."),
  nkeyFile: z.string().default("").describe("File holding an nkey seed (SU...) for nkey auth."),
};

export type NatsCredentials = { [K in keyof typeof natsCredentials]: string };

/** Refuses a NATS section that mixes ways to authenticate, naming the keys. */
export function checkNatsCredentials(n: NatsCredentials, ctx: z.RefinementCtx): void {
  const ways: Array<[string, boolean]> = [
    ["user", Boolean(n.user || n.password || n.passwordFile)],
    ["token", Boolean(n.token || n.tokenFile)],
    ["credsFile", Boolean(n.credsFile)],
    ["nkeyFile", Boolean(n.nkeyFile)],
  ];
  const used = ways.filter(([, on]) => on).map(([key]) => key);
  if (used.length > 1)
    ctx.addIssue({ code: "custom", path: [used[1]!], message: `use one way to authenticate, not ${used.join(" and ")}` });
  for (const [value, file] of [
    ["password", "passwordFile"],
    ["token", "tokenFile"],
  ] as const) {
    if (n[value] && n[file]) ctx.addIssue({ code: "custom", path: [file], message: `set ${value} or ${file}, not both` });
  }
  if ((n.password || n.passwordFile) && !n.user) ctx.addIssue({ code: "custom", path: ["user"], message: "a password needs its user" });
}
