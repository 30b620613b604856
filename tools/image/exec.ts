import { spawn, type SpawnOptions } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";

/** How a command ended, with everything it printed (stdout and stderr interleaved in `output`). */
export interface Exited {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  output: string;
}

export interface ExecOptions extends Pick<SpawnOptions, "cwd" | "env"> {
  /** Killed (SIGKILL, with its process group) after this long; the result then says so. */
  timeoutMs: number;
  /** Bytes piped to stdin, then closed. */
  input?: Buffer | string;
}

/** Runs `command` to its end and resolves with its output; never rejects on a failing exit. */
export function exec(command: string, args: string[], options: ExecOptions): Promise<Exited> {
  return new Promise((resolve, reject) => {
    // A process group of its own, so a timeout takes the command's children (buildah's runtime) with it.
    const child = spawn(command, args, { cwd: options.cwd, env: options.env, stdio: ["pipe", "pipe", "pipe"], detached: true });
    let stdout = "";
    let output = "";
    let timedOut = false;
    child.stdout.on("data", (d: Buffer) => ((stdout += d.toString()), (output += d.toString())));
    child.stderr.on("data", (d: Buffer) => (output += d.toString()));
    const timer = setTimeout(() => {
      timedOut = true;
      killGroup(child.pid);
    }, options.timeoutMs);
    child.once("error", (err) => (clearTimeout(timer), reject(err)));
    child.once("close", (code, signal) => {
      clearTimeout(timer);
      const note = timedOut ? `\n[${command} killed after ${options.timeoutMs} ms]` : "";
      resolve({ code, signal, stdout, output: output + note });
    });
    child.stdin.end(options.input ?? "");
  });
}

/** Runs `command` and resolves with its stdout; rejects with the whole output when it fails. */
export async function execOk(command: string, args: string[], options: ExecOptions): Promise<string> {
  const r = await exec(command, args, options);
  if (r.code !== 0) throw new Error(`${command} ${args.join(" ")} exited with ${r.code ?? r.signal}:\n${r.output.slice(-8000)}`);
  return r.stdout;
}

export function killGroup(pid: number | undefined, signal: NodeJS.Signals = "SIGKILL"): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, signal);
  } catch {
    // Already gone.
  }
}

/** Parent pid of every live process, read from /proc (a process may vanish while it is read). */
function parents(): Map<number, number> {
  const out = new Map<number, number>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      // The command name is in parentheses and may hold spaces; the fields after it are fixed.
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      out.set(Number(name), ppid);
    } catch {
      continue;
    }
  }
  return out;
}

/** The pids below `root` in the process tree, parents before their children. */
export function descendants(root: number): number[] {
  const ppid = parents();
  const depth = (pid: number): number => {
    let d = 0;
    for (let p = ppid.get(pid); p !== undefined && p > 1; p = ppid.get(p), d++) if (p === root) return d + 1;
    return 0;
  };
  return [...ppid.keys()]
    .map((pid) => [pid, depth(pid)] as const)
    .filter(([, d]) => d > 0)
    .sort((a, b) => a[1] - b[1])
    .map(([pid]) => pid);
}

/** A process's command name (its executable's, 15 characters at most); "" once it is gone. */
export function commOf(pid: number): string {
  try {
    return readFileSync(`/proc/${pid}/comm`, "utf8").trim();
  } catch {
    return "";
  }
}

/** The pids below `root` whose command name is `comm`. */
export function descendantsNamed(root: number, comm: string): number[] {
  return descendants(root).filter((pid) => commOf(pid) === comm);
}
