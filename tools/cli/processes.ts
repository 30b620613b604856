import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, existsSync, mkdirSync, readFileSync } from "node:fs";
import { getPriority, setPriority } from "node:os";
import { join } from "node:path";
import { PARENT_FD_ENV, STATUS_FILE_ENV } from "../../services/common/service-main.js";
import { roleEnv } from "./role-env.js";

/**
 * Lowers a just-started process's scheduling priority by `nice`. Linux sets it on the main thread
 * only, and the threads that thread starts later inherit it: onnxruntime's pool and the tokenizer's
 * threads are started long after this runs. A process that already ended needs nothing.
 */
function lowerPriority(pid: number | undefined, nice: number): void {
  if (pid === undefined) return;
  try {
    setPriority(pid, Math.min(19, getPriority(pid) + nice));
  } catch {
    // It exited already; its exit is reported as any other.
  }
}

/**
 * Role processes of a local run: each is `node --import tsx services/<role>/main.ts --config FILE`
 * with its own --set flags, its output in logs/<id>.log (appended to across restarts), an exit
 * promise the CLI waits on, and a pipe on fd 3 that the CLI holds open: when the CLI dies, even
 * SIGKILLed, the pipe closes and the role stops (serviceMain watches it), so no role outlives it.
 * On exit the role writes its last Status to status/<id>.json in the run folder.
 */
export interface RoleProcess {
  id: string;
  role: "buffer" | "producer" | "trainer";
  address: string;
  log: string;
  child: ChildProcess;
  /** Resolves with the exit code (or 128 + signal) once the process ended and its log holds all it wrote. */
  exited: Promise<number>;
  /** The signal that ended it, once it has; undefined while it runs or when it exited by itself. */
  signal?: NodeJS.Signals;
  /** Where it writes its last Status when it exits. */
  statusFile: string;
}

/** Where a role of the run writes its last Status. */
export const statusFileOf = (runDir: string, id: string) => join(runDir, "status", `${id}.json`);

const SIGNAL_NUMBERS: Partial<Record<NodeJS.Signals, number>> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGABRT: 6,
  SIGKILL: 9,
  SIGSEGV: 11,
  SIGTERM: 15,
};

export function spawnRole(
  root: string,
  runDir: string,
  role: RoleProcess["role"],
  id: string,
  address: string,
  configFile: string,
  sets: string[],
  nice = 0,
): RoleProcess {
  const logs = join(runDir, "logs");
  mkdirSync(logs, { recursive: true });
  const log = join(logs, `${id}.log`);
  const out = createWriteStream(log, { flags: "a" });
  const args = ["--import", "tsx", join(root, "services", role, "main.ts"), "--config", configFile, ...sets.flatMap((s) => ["--set", s])];
  const statusFile = statusFileOf(runDir, id);
  const env = { ...roleEnv(), [PARENT_FD_ENV]: "3", [STATUS_FILE_ENV]: statusFile };
  const child = spawn(process.execPath, args, { cwd: root, stdio: ["ignore", "pipe", "pipe", "pipe"], env });
  if (nice > 0) lowerPriority(child.pid, nice);
  child.stdout!.pipe(out, { end: false });
  child.stderr!.pipe(out, { end: false });
  // The CLI never writes to the launcher pipe; it only has to stay open while the CLI lives.
  (child.stdio[3] as NodeJS.ReadableStream & { unref?: () => void }).unref?.();
  const p: RoleProcess = { id, role, address, log, child, exited: Promise.resolve(0), statusFile };
  // "close" comes after the pipes emptied, and end's callback once the log file holds it all, so
  // whoever awaits the exit can read the role's last words.
  p.exited = new Promise<number>((resolve) => {
    child.once("close", (code, signal) => {
      if (signal) p.signal = signal;
      out.end(() => resolve(code ?? 128 + (SIGNAL_NUMBERS[signal!] ?? 2)));
    });
  });
  return p;
}

/** "exit code 1" or "signal SIGKILL": how a role process ended. */
export const howEnded = (p: RoleProcess, code: number): string => (p.signal ? `signal ${p.signal}` : `exit code ${code}`);

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
