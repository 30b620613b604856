import { exec, execOk } from "./exec.js";

/**
 * Where an image's bytes are, measured with du inside it: the whole tree, a few top folders (each on
 * its own, so a folder inside another is counted in both), the packages (in one du, so files
 * hard-linked between packages count once, esbuild's binary among them) and their native libraries.
 */
export interface SizeReport {
  image: string;
  /** Uncompressed bytes of the image, as the storage counts them. */
  bytes: number;
  /** KiB per path, largest first: the operating system, node, the dependencies by package, services/. */
  paths: Array<{ path: string; kib: number }>;
}

const SCRIPT = `
set -e
top() { du -skx "$1"; }
top /
for p in /usr/local/bin/node /app/node_modules /app/services /usr /var /etc; do top "$p"; done
{ find /app/node_modules -mindepth 1 -maxdepth 1 ! -name '@*' ! -name '.*'; find /app/node_modules -mindepth 2 -maxdepth 2 -path '/app/node_modules/@*'; } | xargs -d '\\n' du -sk
find /app/node_modules -name '*.so*' -o -name '*.node' | xargs -r du -k
`;

export async function sizeReport(image: string): Promise<SizeReport> {
  const opts = { timeoutMs: 300_000 };
  const bytes = Number((await execOk("podman", ["image", "inspect", "--format", "{{.Size}}", image], opts)).trim());
  const c = (await execOk("buildah", ["from", "--pull=never", image], opts)).trim();
  try {
    const out = await execOk("buildah", ["run", "--isolation", "chroot", "--user", "0:0", c, "--", "sh", "-c", SCRIPT], opts);
    const seen = new Set<string>();
    const paths = out
      .trim()
      .split("\n")
      .map((line) => line.split("\t"))
      .filter(([, path]) => path && !seen.has(path) && seen.add(path))
      .map(([kib, path]) => ({ path: path!, kib: Number(kib) }))
      .sort((a, b) => b.kib - a.kib);
    return { image, bytes, paths };
  } finally {
    await exec("buildah", ["rm", c], opts);
  }
}

/** The report as text: the total, then every path of at least 1 MiB. */
export function formatSize(report: SizeReport, minKib = 1024): string {
  const mib = (kib: number) => `${(kib / 1024).toFixed(1).padStart(7)} MiB`;
  const lines = [`${report.image}: ${(report.bytes / 2 ** 20).toFixed(0)} MiB uncompressed`];
  for (const p of report.paths) if (p.kib >= minKib) lines.push(`${mib(p.kib)}  ${p.path}`);
  return lines.join("\n") + "\n";
}
