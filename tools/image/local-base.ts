import { createHash } from "node:crypto";
import {
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { exec, execOk } from "./exec.js";

/**
 * Base images for deploy/docker/Dockerfile on a machine that reaches no image registry, only a
 * Debian mirror: a minimal Debian root filesystem made by debootstrap (cached as a tarball under
 * .cache/image/, about a minute to make), imported as a local image, and a "node" image on top of it
 * holding this machine's own node and npm where the official node image keeps them. The Dockerfile's
 * stages then build on them unchanged (its base images are build arguments).
 */

export const ROOT = fileURLToPath(new URL("../../", import.meta.url));
export const CACHE = join(ROOT, ".cache/image");
const SUITE = "bookworm";
const TARBALL = join(CACHE, `debian-${SUITE}-minbase.tar`);
const FALLBACK_MIRROR = "http://deb.debian.org/debian";

export type Log = (line: string) => void;

/** The Dockerfile's build arguments that name base images. */
export interface BaseImages {
  NODE_IMAGE: string;
  CPU_IMAGE: string;
  CUDA_IMAGE: string;
}

/** The first Debian archive apt is configured with (not its security or updates suites). */
export function debianMirror(): string {
  const files = ["/etc/apt/sources.list"];
  const dir = "/etc/apt/sources.list.d";
  if (existsSync(dir)) files.push(...readdirSync(dir).map((f) => join(dir, f)));
  for (const file of files.filter((f) => existsSync(f))) {
    const text = readFileSync(file, "utf8");
    // deb822 (.sources): URIs and Suites fields of one stanza.
    for (const stanza of text.split(/\n\s*\n/)) {
      const uri = /^URIs:\s*(\S+)/m.exec(stanza)?.[1];
      const suites = /^Suites:\s*(.+)$/m.exec(stanza)?.[1]?.split(/\s+/) ?? [];
      if (uri && /\/debian\/?$/.test(uri) && suites.some((s) => !s.includes("-"))) return uri;
    }
    // One-line format: deb [options] URI suite components.
    for (const m of text.matchAll(/^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+([^\s-]+)\s/gm)) {
      if (/\/debian\/?$/.test(m[1]!)) return m[1]!;
    }
  }
  return FALLBACK_MIRROR;
}

function requireRoot(): void {
  if (process.getuid?.() !== 0) throw new Error("building the image locally needs root (debootstrap and buildah's storage)");
}

/** dpkg's exclusions in Debian's official slim images (debuerreotype's --slimify), so packages installed later stay slim too. */
const SLIM_DPKG = `path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
`;

/** Makes a debootstrap root as slim as debian:bookworm-slim: what dpkg would exclude, package files, lists and caches go. */
function slim(root: string): void {
  writeFileSync(join(root, "etc/dpkg/dpkg.cfg.d/docker"), SLIM_DPKG);
  // Only real folders are entered: a symbolic link in the root may point at the host's own files.
  const isFolder = (path: string) => existsSync(path) && lstatSync(path).isDirectory();
  const empty = (dir: string, keep: (name: string) => boolean = () => false) => {
    if (!isFolder(join(root, dir))) return;
    for (const name of readdirSync(join(root, dir))) if (!keep(name)) rmSync(join(root, dir, name), { recursive: true, force: true });
  };
  for (const pkg of readdirSync(join(root, "usr/share/doc"))) empty(`usr/share/doc/${pkg}`, (name) => name === "copyright");
  for (const dir of ["usr/share/man", "usr/share/groff", "usr/share/info", "usr/share/lintian", "usr/share/linda"]) empty(dir);
  empty("usr/share/locale", (name) => name === "locale.alias");
  empty("var/cache/apt/archives", (name) => name === "partial" || name === "lock");
  empty("var/lib/apt/lists", (name) => name === "partial" || name === "lock");
  empty("var/cache/apt", (name) => name === "archives");
}

/** The minimal Debian root filesystem as a tarball, made once with debootstrap. */
export async function baseTarball(log: Log): Promise<string> {
  if (existsSync(TARBALL)) return TARBALL;
  requireRoot();
  const mirror = debianMirror();
  log(`debootstrap --variant=minbase ${SUITE} from ${mirror} (once; cached in ${TARBALL})`);
  const work = mkdtempSync(join(tmpdir(), "saeflow-debootstrap-"));
  try {
    const root = join(work, "root");
    await execOk("debootstrap", ["--variant=minbase", SUITE, root, mirror], { timeoutMs: 600_000 });
    slim(root);
    mkdirSync(CACHE, { recursive: true });
    const partial = `${TARBALL}.${process.pid}.partial`;
    await execOk("tar", ["-C", root, "--numeric-owner", "-cf", partial, "."], { timeoutMs: 300_000 });
    renameSync(partial, TARBALL);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return TARBALL;
}

export async function imageExists(name: string): Promise<boolean> {
  return (await exec("buildah", ["inspect", "--type", "image", name], { timeoutMs: 60_000 })).code === 0;
}

/** The tarball as a local image, named after the tarball's age so a remade tarball makes a new image. */
export async function debianImage(log: Log): Promise<string> {
  const tarball = await baseTarball(log);
  const name = `localhost/saeflow-local/debian:${SUITE}-${Math.floor(statSync(tarball).mtimeMs).toString(36)}`;
  if (await imageExists(name)) return name;
  requireRoot();
  log(`importing ${tarball} as ${name}`);
  await execOk("podman", ["import", tarball, name], { timeoutMs: 300_000 });
  return name;
}

/** This machine's npm package folder (npm-cli.js lives in its bin/). */
async function npmFolder(): Promise<string> {
  const root = (await execOk("npm", ["root", "-g"], { timeoutMs: 60_000 })).trim();
  const dir = join(root, "npm");
  if (!existsSync(join(dir, "bin/npm-cli.js"))) throw new Error(`npm root -g is ${root}, which holds no npm/bin/npm-cli.js`);
  return dir;
}

/**
 * The debian image with this machine's node at /usr/local/bin/node and npm under
 * /usr/local/lib/node_modules, as the official node image lays them out. The CA bundle node trusts
 * here (NODE_EXTRA_CA_CERTS, e.g. a proxy's) goes along so `npm ci` in the build reaches the
 * registry as the machine's own npm does; it stays in the build stages, not in the runtime images.
 */
export async function nodeImage(debian: string, log: Log): Promise<string> {
  const npm = await npmFolder();
  const npmVersion = (JSON.parse(readFileSync(join(npm, "package.json"), "utf8")) as { version: string }).version;
  const ca = process.env.NODE_EXTRA_CA_CERTS && existsSync(process.env.NODE_EXTRA_CA_CERTS) ? process.env.NODE_EXTRA_CA_CERTS : undefined;
  const key = createHash("sha256")
    .update(JSON.stringify([debian, process.execPath, statSync(process.execPath).mtimeMs, npmVersion, ca ? readFileSync(ca, "utf8") : ""]))
    .digest("hex")
    .slice(0, 12);
  const name = `localhost/saeflow-local/node:${process.versions.node}-npm${npmVersion}-${key}`;
  if (await imageExists(name)) return name;
  requireRoot();
  log(`making ${name} from ${process.execPath} and ${npm}`);
  const opts = { timeoutMs: 300_000 };
  const c = (await execOk("buildah", ["from", "--pull=never", debian], opts)).trim();
  try {
    await execOk("buildah", ["copy", "--quiet", c, process.execPath, "/usr/local/bin/node"], opts);
    await execOk("buildah", ["copy", "--quiet", c, npm, "/usr/local/lib/node_modules/npm"], opts);
    const links =
      "ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx";
    await execOk("buildah", ["run", "--isolation", "chroot", c, "--", "sh", "-c", `${links} && node --version && npm --version`], opts);
    if (ca) {
      await execOk("buildah", ["copy", "--quiet", c, ca, "/usr/local/share/saeflow-build/extra-ca.crt"], opts);
      await execOk("buildah", ["config", "--env", "NODE_EXTRA_CA_CERTS=/usr/local/share/saeflow-build/extra-ca.crt", c], opts);
    }
    await execOk("buildah", ["commit", "--quiet", "--rm", c, name], opts);
  } catch (err) {
    await exec("buildah", ["rm", c], opts);
    throw err;
  }
  return name;
}

/**
 * Local stand-ins for the Dockerfile's base images: node for NODE_IMAGE, Debian for CPU_IMAGE and for
 * CUDA_IMAGE (no CUDA libraries: the cuda target's own steps run on it up to the provider download).
 */
export async function localBases(log: Log): Promise<BaseImages> {
  const debian = await debianImage(log);
  const node = await nodeImage(debian, log);
  return { NODE_IMAGE: node, CPU_IMAGE: debian, CUDA_IMAGE: debian };
}
