import { exec, execOk } from "./exec.js";

/**
 * Keeps the image store from growing with every build: a changed lockfile or source tree leaves the
 * previous build's layers behind, and a remade base leaves the previous base. Only images built on
 * the local bases (localhost/saeflow-local/...) are touched; nobody else's.
 */

export const LOCAL_PREFIX = "localhost/saeflow-local/";

interface StoredImage {
  Id: string;
  ParentId: string;
  Names?: string[];
  Containers: number;
}

async function list(): Promise<StoredImage[]> {
  return JSON.parse(await execOk("podman", ["images", "--all", "--format", "json"], { timeoutMs: 60_000 })) as StoredImage[];
}

/**
 * Removes, until none is left, every image descended from a local base that no tag names (other than
 * local ones not in `keep`), that no other image builds on and that no container uses. Resolves with
 * how many images went.
 */
export async function pruneLocalImages(keep: string[]): Promise<number> {
  let removed = 0;
  for (;;) {
    const images = await list();
    const byId = new Map(images.map((i) => [i.Id, i]));
    const isBase = (i: StoredImage) => (i.Names ?? []).some((n) => n.startsWith(LOCAL_PREFIX));
    const fromBase = (i: StoredImage | undefined): boolean => !!i && (isBase(i) || fromBase(byId.get(i.ParentId)));
    const parents = new Set(images.map((i) => i.ParentId));
    const unneeded = (i: StoredImage) => (i.Names ?? []).every((n) => n.startsWith(LOCAL_PREFIX) && !keep.includes(n));
    const doomed = images.filter((i) => fromBase(i) && unneeded(i) && !parents.has(i.Id) && i.Containers === 0);
    if (!doomed.length) return removed;
    const r = await exec("buildah", ["rmi", ...doomed.map((i) => i.Id)], { timeoutMs: 120_000 });
    if (r.code !== 0) return removed;
    removed += doomed.length;
  }
}
