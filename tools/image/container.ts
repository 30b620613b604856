import { spawn } from "node:child_process";
import { commOf, descendants, descendantsNamed, exec, execOk, killGroup } from "./exec.js";

/**
 * A working container of an image, and processes run in it with `buildah run --isolation chroot`:
 * they share the host's network (a role serves on the host's ports and reaches nats-server there)
 * and are not given a PID namespace, so the image's init (tini) is found in the host's process tree
 * to deliver signals, as the kubelet signals a container's PID 1.
 */

export interface ImageConfig {
  User?: string;
  Entrypoint?: string[];
  Cmd?: string[];
  WorkingDir?: string;
  Env?: string[];
}

export async function imageConfig(image: string): Promise<ImageConfig> {
  const out = await execOk("buildah", ["inspect", "--type", "image", image], { timeoutMs: 60_000 });
  return (JSON.parse(out) as { OCIv1: { config: ImageConfig } }).OCIv1.config;
}

export interface BindMount {
  source: string;
  target: string;
  readOnly: boolean;
}

export interface RunOptions {
  /** uid:gid */
  user: string;
  env?: Record<string, string>;
  mounts?: BindMount[];
  capDrop?: string[];
  /** The argv inside the container. */
  argv: string[];
}

export interface InContainer {
  readonly pid: number;
  /** Resolves with the exit code (null when killed) once the process ended. */
  readonly exited: Promise<number | null>;
  output(): string;
  /** Delivers `signal` to the process named `init` (the image's PID 1, e.g. tini) inside the container. */
  signal(init: string, signal: NodeJS.Signals): boolean;
  /**
   * Kills what runs inside the container, so that buildah, seeing it end, removes its run folder
   * (killing buildah itself would leave one in /var/tmp); buildah too if it has not ended after 10 s.
   */
  kill(): Promise<void>;
}

export class Container {
  private constructor(
    readonly name: string,
    readonly image: string,
  ) {}

  static async from(image: string, name: string): Promise<Container> {
    // A container left by an earlier run that was killed would hold the name.
    await exec("buildah", ["rm", name], { timeoutMs: 60_000 });
    await execOk("buildah", ["from", "--pull=never", "--name", name, image], { timeoutMs: 120_000 });
    return new Container(name, image);
  }

  run(options: RunOptions): InContainer {
    const args = ["run", "--isolation", "chroot", "--user", options.user];
    for (const cap of options.capDrop ?? []) args.push("--cap-drop", cap);
    for (const [k, v] of Object.entries(options.env ?? {})) args.push("--env", `${k}=${v}`);
    for (const m of options.mounts ?? []) args.push("--volume", `${m.source}:${m.target}${m.readOnly ? ":ro" : ""}`);
    args.push(this.name, "--", ...options.argv);
    const child = spawn("buildah", args, { stdio: ["ignore", "pipe", "pipe"], detached: true });
    let output = "";
    child.stdout.on("data", (d: Buffer) => (output += d.toString()));
    child.stderr.on("data", (d: Buffer) => (output += d.toString()));
    const exited = new Promise<number | null>((resolve) => {
      child.once("error", (err) => ((output += `\n${err.message}`), resolve(null)));
      child.once("close", (code) => resolve(code));
    });
    const pid = child.pid!;
    return {
      pid,
      exited,
      output: () => output,
      signal: (init, signal) => {
        const [target] = descendantsNamed(pid, init);
        if (target === undefined) return false;
        process.kill(target, signal);
        return true;
      },
      kill: async () => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        // buildah's own helpers run from a memfd copy of itself ("memfd:buildah-c..."); the rest is the container's.
        const inside = descendants(pid).filter((p) => !/^(memfd:)?buildah/.test(commOf(p)));
        for (const p of inside.reverse()) {
          try {
            process.kill(p, "SIGKILL");
          } catch {
            // Already gone.
          }
        }
        const ended = await Promise.race([exited.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000))]);
        if (!ended) killGroup(pid);
      },
    };
  }

  /**
   * Removes containers named `<prefix>...-<pid>` whose process is gone: a run that was killed before
   * it could clean up leaves them, holding their images' layers.
   */
  static async removeStale(prefix: string): Promise<void> {
    const names = await execOk("buildah", ["containers", "--format", "{{.ContainerName}}"], { timeoutMs: 60_000 });
    for (const name of names.split("\n")) {
      const pid = name.startsWith(prefix) ? Number(/-(\d+)$/.exec(name)?.[1]) : NaN;
      if (Number.isInteger(pid) && !alive(pid)) await exec("buildah", ["rm", name], { timeoutMs: 60_000 });
    }
  }

  /** Paths the container's own layer changed (podman diff): "A /path", "C /path", "D /path". */
  async changes(): Promise<string[]> {
    const out = await execOk("podman", ["diff", this.name], { timeoutMs: 60_000 });
    return out.split("\n").filter(Boolean);
  }

  async remove(): Promise<void> {
    await exec("buildah", ["rm", this.name], { timeoutMs: 60_000 });
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
