import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";

/**
 * A throwaway certificate authority made with Debian's `openssl` CLI: `saeflow up --tls` gives each
 * process of a local run its own certificate from it, and the security tests make theirs the same
 * way (plus a foreign CA and expired certificates). EC P-256 keys; every leaf serves and calls
 * (serverAuth and clientAuth), since every role is both a gRPC server and a client.
 */
export interface Issued {
  cert: string;
  key: string;
}

export interface IssueOptions {
  /** Subject CN: the identity transport.tls authorizes by (e.g. saeflow-producer). */
  cn: string;
  /** subjectAltName entries, e.g. DNS:localhost, IP:127.0.0.1, URI:spiffe://saeflow/producer-0. */
  sans?: string[];
  /** Validity window; defaults to from an hour ago (clock skew) until `days` from now. */
  notBefore?: Date;
  notAfter?: Date;
  days?: number;
}

export interface LocalCa extends Issued {
  dir: string;
  /** Writes <dir>/<name>.crt and <name>.key, signed by this CA. */
  issue(name: string, options: IssueOptions): Issued;
}

export const LOCAL_SANS = ["DNS:localhost", "IP:127.0.0.1"];
const CURVE = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];

function openssl(args: string[], cwd: string): void {
  try {
    execFileSync("openssl", args, { cwd, stdio: ["ignore", "ignore", "pipe"] });
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: Buffer };
    if (e.code === "ENOENT") throw new Error("making certificates needs the openssl command: apt-get install openssl", { cause: err });
    throw new Error(`openssl ${args[0]} failed: ${e.stderr?.toString().trim() ?? e.message}`, { cause: err });
  }
}

/** openssl ca's time format, YYYYMMDDHHMMSSZ. */
const asn1Time = (d: Date): string => `${d.toISOString().replace(/[-:T]/g, "").slice(0, 14)}Z`;

const CA_CONFIG = `[ca]
default_ca = local
[local]
database = db/index.txt
new_certs_dir = db
serial = db/serial
default_md = sha256
policy = any
unique_subject = no
[any]
commonName = supplied
`;

/** A new CA in `dir` (created), valid for `days`. */
export function makeCa(dir: string, cn = "saeflow local CA", days = 30): LocalCa {
  mkdirSync(join(dir, "db"), { recursive: true });
  writeFileSync(join(dir, "db/index.txt"), "");
  writeFileSync(join(dir, "db/serial"), "01\n");
  writeFileSync(join(dir, "ca.cnf"), CA_CONFIG);
  const ca = { cert: join(dir, "ca.crt"), key: join(dir, "ca.key") };
  openssl(
    [
      "req",
      "-x509",
      ...CURVE,
      "-keyout",
      ca.key,
      "-out",
      ca.cert,
      "-subj",
      `/CN=${cn}`,
      "-days",
      String(days),
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
    ],
    dir,
  );
  chmodSync(ca.key, 0o600);
  return { dir, ...ca, issue: (name, options) => issue(dir, ca, name, options) };
}

function issue(dir: string, ca: Issued, name: string, options: IssueOptions): Issued {
  const out = { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`) };
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  const sans = options.sans ?? LOCAL_SANS;
  writeFileSync(
    ext,
    [
      "[leaf]",
      "basicConstraints = CA:FALSE",
      "keyUsage = critical, digitalSignature, keyEncipherment",
      "extendedKeyUsage = serverAuth, clientAuth",
      ...(sans.length ? [`subjectAltName = ${sans.join(", ")}`] : []),
      "",
    ].join("\n"),
  );
  openssl(["req", "-new", ...CURVE, "-keyout", out.key, "-out", csr, "-subj", `/CN=${options.cn}`], dir);
  chmodSync(out.key, 0o600);
  const from = options.notBefore ?? new Date(Date.now() - 3600_000);
  const until = options.notAfter ?? new Date(Date.now() + (options.days ?? 30) * 86400_000);
  openssl(
    [
      "ca",
      "-batch",
      "-config",
      "ca.cnf",
      "-cert",
      ca.cert,
      "-keyfile",
      ca.key,
      "-in",
      csr,
      "-out",
      out.cert,
      "-notext",
      "-startdate",
      asn1Time(from),
      "-enddate",
      asn1Time(until),
      "-extfile",
      ext,
      "-extensions",
      "leaf",
    ],
    dir,
  );
  rmSync(csr);
  rmSync(ext);
  return out;
}
