import { type ChildProcess, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { delimiter, join } from "node:path";

/**
 * Starts a real nats-server on 127.0.0.1 for local runs and tests. Found on PATH, in /usr/sbin
 * (Debian's package) or in the project's .cache/nats (unpacked there by the CLI when missing).
 */
export interface NatsServer {
  url: string;
  port: number;
  /** Stops the server; resolves when the process has exited. */
  stop(): Promise<void>;
}

export function findNatsServer(cwd = process.cwd()): string | undefined {
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/sbin", "/usr/local/sbin", join(cwd, ".cache/nats/usr/sbin")];
  return dirs.map((d) => join(d, "nats-server")).find((p) => existsSync(p));
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

export interface NatsServerOptions {
  port?: number;
  binary?: string;
  timeoutMs?: number;
  /** A nats-server config file (authorization, tls blocks); the address and port flags still apply. */
  configFile?: string;
}

export async function startNatsServer(options: NatsServerOptions = {}): Promise<NatsServer> {
  const binary = options.binary ?? findNatsServer();
  if (!binary) throw new Error("nats-server not found: install it (apt-get install nats-server) or set NATS_URL");
  const port = options.port ?? (await freePort());
  const args = [...(options.configFile ? ["-c", options.configFile] : []), "-a", "127.0.0.1", "-p", String(port)];
  const child: ChildProcess = spawn(binary, args, { stdio: ["ignore", "ignore", "pipe"] });
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  // A test or CLI that dies without stopping the server must not leave it running.
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);
  void exited.then(() => process.off("exit", killOnExit));
  await new Promise<void>((resolve, reject) => {
    let log = "";
    const timer = setTimeout(
      () => reject(new Error(`nats-server did not start within ${options.timeoutMs ?? 10000} ms:\n${log}`)),
      options.timeoutMs ?? 10000,
    );
    child.stderr!.on("data", (d: Buffer) => {
      log += d.toString();
      if (log.includes("Server is ready")) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`nats-server exited with ${code}:\n${log}`));
    });
  });
  child.stderr!.resume();
  return {
    url: `nats://127.0.0.1:${port}`,
    port,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await exited;
    },
  };
}
