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
  pid: number;
  /** Resolves once the process has ended, with how (exit code, or the signal that killed it). */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Stops the server; resolves when the process has exited. */
  stop(): Promise<void>;
}

/**
 * setpriv (util-linux) sets a parent-death signal before it execs nats-server, so the server dies
 * with whoever started it, even a SIGKILLed CLI (nats-server cannot watch a pipe as the roles do).
 */
function withParentDeath(binary: string, args: string[]): [string, string[]] {
  const setpriv = ["/usr/bin/setpriv", "/bin/setpriv"].find((p) => existsSync(p));
  return setpriv ? [setpriv, ["--pdeathsig", "SIGKILL", "--", binary, ...args]] : [binary, args];
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
  const child: ChildProcess = spawn(...withParentDeath(binary, args), { stdio: ["ignore", "ignore", "pipe"] });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once("exit", (code, signal) => resolve({ code, signal })),
  );
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
    pid: child.pid ?? -1,
    exited,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await exited;
    },
  };
}
