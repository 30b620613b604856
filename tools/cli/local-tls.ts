import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { type Issued, LOCAL_SANS, makeCa } from "./pki.js";

/**
 * What `saeflow up --tls` makes in <run>/tls: a CA for this run alone, a certificate per role
 * process (CN saeflow-<role>, the identities transport.tls authorizes by default), an operator's for
 * the CLI and grpcurl, one with a trainer's identity for `saeflow export` (it pulls calibration
 * batches as a trainer does), and a NATS server that speaks only TLS and wants a token.
 */
export interface LocalTls {
  dir: string;
  ca: string;
  operator: Issued;
  exporter: Issued;
  /** The name every server's certificate carries and every client expects (127.0.0.1 as a TLS name draws a warning from node). */
  serverName: string;
  /** The certificate of one role process. */
  issue(id: string, role: "buffer" | "producer" | "trainer"): Issued;
  /** nats-server's config, and the token file (0600) the roles read through nats.tokenFile. */
  nats: { configFile: string; tokenFile: string };
}

export function makeLocalTls(runDir: string): LocalTls {
  const dir = join(runDir, "tls");
  // A year: a local run never outlives its certificates, and nothing outside the run trusts this CA.
  const days = 365;
  const ca = makeCa(dir, "saeflow local CA", days);
  const natsCert = ca.issue("nats", { cn: "saeflow-nats", days });
  const token = `t${randomBytes(24).toString("hex")}`;
  const configFile = join(dir, "nats.conf");
  const tokenFile = join(dir, "nats.token");
  writeFileSync(tokenFile, token, { mode: 0o600 });
  writeFileSync(
    configFile,
    [
      "# Written by saeflow up --tls: TLS only, and a token every role presents.",
      "tls {",
      `  cert_file: ${JSON.stringify(natsCert.cert)}`,
      `  key_file: ${JSON.stringify(natsCert.key)}`,
      "}",
      "authorization {",
      `  token: ${JSON.stringify(token)}`,
      "}",
      "",
    ].join("\n"),
    { mode: 0o600 },
  );
  return {
    dir,
    ca: ca.cert,
    operator: ca.issue("operator", { cn: "saeflow-operator", days }),
    exporter: ca.issue("exporter", { cn: "saeflow-trainer", sans: [...LOCAL_SANS, "URI:saeflow:export"], days }),
    serverName: "localhost",
    issue: (id, role) => ca.issue(id, { cn: `saeflow-${role}`, sans: [...LOCAL_SANS, `URI:saeflow:${id}`], days }),
    nats: { configFile, tokenFile },
  };
}
