import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { findNatsServer, type NatsServer, startNatsServer } from "./nats-server.js";

/**
 * NATS without a set-up step: NATS_URL when given; else nats-server from PATH (or /usr/sbin); else
 * Debian's package fetched with `apt-get download` and unpacked into .cache/nats (no root needed to
 * unpack, nothing installed system-wide); else an error that says exactly what to run.
 */
export interface NatsForRun {
  url: string;
  /** Set when this run started the server; stop it at the end. */
  server?: NatsServer;
  /** Starts the same server again on the same port (after it died), when this run started it. */
  restart?: () => Promise<NatsServer>;
}

function fetchDebianNats(root: string, log: (line: string) => void): string | undefined {
  const dir = join(root, ".cache/nats");
  mkdirSync(dir, { recursive: true });
  try {
    log("nats-server not found; fetching Debian's nats-server package into .cache/nats");
    execFileSync("apt-get", ["download", "nats-server"], { cwd: dir, stdio: "ignore" });
    const deb = readdirSync(dir).find((f) => f.startsWith("nats-server_") && f.endsWith(".deb"));
    if (!deb) return undefined;
    execFileSync("dpkg-deb", ["-x", deb, "."], { cwd: dir, stdio: "ignore" });
  } catch {
    return undefined;
  }
  return findNatsServer(root);
}

/** `configFile` (a TLS run's) configures the server this run starts; a server given by NATS_URL is used as it is. */
export async function natsForRun(
  root: string,
  env: NodeJS.ProcessEnv,
  log: (line: string) => void,
  configFile?: string,
): Promise<NatsForRun> {
  if (env.NATS_URL) return { url: env.NATS_URL };
  const binary = findNatsServer(root) ?? fetchDebianNats(root, log);
  if (!binary) {
    throw new Error(
      "nats-server is not installed and could not be fetched. Run one of:\n" +
        "  sudo apt-get install nats-server        (Debian/Ubuntu)\n" +
        "  NATS_URL=nats://HOST:4222 npm start      (use a running server)",
    );
  }
  const options = { binary, ...(configFile ? { configFile } : {}) };
  const server = await startNatsServer(options);
  return { url: server.url, server, restart: () => startNatsServer({ ...options, port: server.port }) };
}
