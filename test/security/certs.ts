import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TransportConfig } from "../../services/common/config/index.js";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { type Issued, LOCAL_SANS, type LocalCa, makeCa } from "../../tools/cli/pki.js";

/**
 * Real certificates for the security tests, made with the openssl CLI into a temp folder: the run's
 * CA with one certificate per role and an operator's, plus what must be refused: a certificate from
 * another CA with the operator's name, and an operator's certificate that expired in 2020.
 */
export interface TestPki {
  dir: string;
  ca: LocalCa;
  foreign: LocalCa;
  buffer: Issued;
  producer: Issued;
  trainer: Issued;
  operator: Issued;
  expired: Issued;
  stranger: Issued;
  close(): void;
}

export function makeTestPki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), "saeflow-pki-"));
  const ca = makeCa(join(dir, "ca"), "saeflow test CA");
  const foreign = makeCa(join(dir, "foreign"), "someone else's CA");
  return {
    dir,
    ca,
    foreign,
    buffer: ca.issue("buffer", { cn: "saeflow-buffer" }),
    producer: ca.issue("producer", { cn: "saeflow-producer" }),
    trainer: ca.issue("trainer", { cn: "saeflow-trainer" }),
    operator: ca.issue("operator", { cn: "saeflow-operator" }),
    expired: ca.issue("expired", {
      cn: "saeflow-operator",
      notBefore: new Date("2020-01-01T00:00:00Z"),
      notAfter: new Date("2020-01-02T00:00:00Z"),
    }),
    stranger: foreign.issue("stranger", { cn: "saeflow-operator", sans: LOCAL_SANS }),
    close: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export const HOOK = "blocks.1.hook_resid_post";
export const D_MODEL = 16;

/** A small valid run config for a buffer under transport.tls.mode=`mode` with `own` as its certificate. */
export function tlsConfig(pki: TestPki, own: Issued, mode: "tls" | "mtls" = "mtls", sets: string[] = []): RunConfig {
  return loadConfig({
    sets: [
      "run.id=test",
      `buffer.hookPoints=[{name: ${HOOK}, dModel: ${D_MODEL}}]`,
      "buffer.capacityRows=1024",
      `trainer.hookPoints=[${HOOK}]`,
      `transport.tls.mode=${mode}`,
      `transport.tls.ca=${pki.ca.cert}`,
      `transport.tls.cert=${own.cert}`,
      `transport.tls.key=${own.key}`,
      "transport.tls.serverName=localhost",
      ...sets,
    ],
  });
}

/** `base` calling as `who` (no certificate when undefined), trusting `ca`. */
export function as(base: TransportConfig, who: Issued | undefined, ca = base.tls.ca): TransportConfig {
  return { ...base, tls: { ...base.tls, mode: who ? base.tls.mode : "tls", ca, cert: who?.cert ?? "", key: who?.key ?? "" } };
}

/** The same transport in plaintext: what a stranger without TLS sends. */
export const plaintext = (base: TransportConfig): TransportConfig => ({ ...base, tls: { ...base.tls, mode: "off" } });
