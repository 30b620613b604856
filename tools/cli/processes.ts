import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { roleEnv } from "./role-env.js";

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
  /** Resolves with the exit code (or 128 + signal) once the process ended and its log holds all it wrote. */
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
  const child = spawn(process.execPath, args, { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: roleEnv() });
  child.stdout!.pipe(out, { end: false });
  child.stderr!.pipe(out, { end: false });
  // "close" comes after the pipes emptied, and end's callback once the log file holds it all, so
  // whoever awaits the exit can read the role's last words.
  const exited = new Promise<number>((resolve) => {
    child.once("close", (code, signal) => {
      out.end(() => resolve(code ?? 128 + (signal === "SIGKILL" ? 9 : signal === "SIGTERM" ? 15 : 2)));
    });
  });
  return { id, role, address, log, child, exited };
}

export const isRunning = (p: RoleProcess): boolean => p.child.exitCode === null && p.child.signalCode === null;

/** Asks a process to stop (SIGTERM), then kills it after `graceMs`. */
export async function stopRole(p: RoleProcess, graceMs: number): Promise<number> {
  if (isRunning(p)) p.child.kill("SIGTERM");
  const timer = setTimeout(() => p.child.kill("SIGKILL"), graceMs);
  const code = await p.exited;
  clearTimeout(timer);
  return code;
}

/**
 * What a role said last about why it stopped: serviceMain writes "<role>: <message>", so the lines
 * from the last such one on, without stack frames; the last non-empty line when there is none.
 */
export function errorLines(p: Pick<RoleProcess, "role" | "log">): string | undefined {
  if (!existsSync(p.log)) return undefined;
  const lines = readFileSync(p.log, "utf8")
    .split("\n")
    .filter((l) => l.trim() !== "");
  const from = lines.findLastIndex((l) => l.startsWith(`${p.role}: `));
  if (from < 0) return lines.at(-1);
  return lines
    .slice(from)
    .filter((l) => !/^\s+at /.test(l))
    .slice(0, 8)
    .join("\n");
}

/** "<id> exited with <code> (log: …):" and the role's own last words, indented beneath. */
export function exitReport(p: RoleProcess, code: number): string {
  const said = errorLines(p) ?? "(its log is empty)";
  return `${p.id} exited with ${code} (log: ${p.log}):\n${said.replace(/^/gm, "  ")}`;
}
