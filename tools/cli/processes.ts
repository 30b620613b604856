import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, mkdirSync } from "node:fs";
import { join } from "node:path";

/**
 * Role processes of a local run: each is `node --import tsx services/<role>/main.ts --config FILE`
 * with its own --set flags, its output in logs/<id>.log, and an exit promise the CLI waits on.
 */
export interface RoleProcess {
  id: string;
  role: "buffer" | "producer" | "trainer";
  address: string;
  log: string;
  child: ChildProcess;
  /** Resolves with the exit code (or 128 + signal) when the process ends. */
  exited: Promise<number>;
}

export function spawnRole(
  root: string,
  runDir: string,
  role: RoleProcess["role"],
  id: string,
  address: string,
  configFile: string,
  sets: string[],
): RoleProcess {
  const logs = join(runDir, "logs");
  mkdirSync(logs, { recursive: true });
  const log = join(logs, `${id}.log`);
  const out = createWriteStream(log, { flags: "a" });
  const args = ["--import", "tsx", join(root, "services", role, "main.ts"), "--config", configFile, ...sets.flatMap((s) => ["--set", s])];
  const child = spawn(process.execPath, args, { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: process.env });
  child.stdout!.pipe(out, { end: false });
  child.stderr!.pipe(out, { end: false });
  const exited = new Promise<number>((resolve) => {
    child.once("exit", (code, signal) => {
      out.end();
      resolve(code ?? 128 + (signal === "SIGKILL" ? 9 : signal === "SIGTERM" ? 15 : 2));
    });
  });
  return { id, role, address, log, child, exited };
}

/** Asks a process to stop (SIGTERM), then kills it after `graceMs`. */
export async function stopRole(p: RoleProcess, graceMs: number): Promise<number> {
  if (p.child.exitCode === null && p.child.signalCode === null) p.child.kill("SIGTERM");
  const timer = setTimeout(() => p.child.kill("SIGKILL"), graceMs);
  const code = await p.exited;
  clearTimeout(timer);
  return code;
}
