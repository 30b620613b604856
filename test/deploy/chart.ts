import { spawnSync } from "node:child_process";
import { cpSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Job } from "kubernetes-models/batch/v1";
import { ConfigMap, PersistentVolumeClaim, Service } from "kubernetes-models/v1";
import { parseAllDocuments } from "yaml";
import { helmBinary } from "../../tools/deploy/helm-bin.js";

export const CHART = fileURLToPath(new URL("../../deploy/helm/saeflow", import.meta.url));

export interface HelmResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function helm(args: string[]): HelmResult {
  // A private HOME keeps helm from reading or writing the user's repositories and caches.
  const home = mkdtempSync(join(tmpdir(), "saeflow-helm-home-"));
  try {
    const r = spawnSync(helmBinary(), args, { encoding: "utf8", env: { PATH: process.env.PATH ?? "", HOME: home } });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  } finally {
    rmSync(home, { recursive: true, force: true });
  }
}

/**
 * A copy of the chart that `helm template` can render without network. helm refuses to template a
 * chart whose dependency is not under charts/, even when its condition is false, and the official
 * NATS chart cannot be fetched here; a stand-in named `nats` renders one ConfigMap, so tests see
 * whether nats.deploy switches the dependency on. NOTES.txt is rendered through a ConfigMap too,
 * since `helm template` does not print notes.
 */
export function offlineChart(): { dir: string; close(): void } {
  const root = mkdtempSync(join(tmpdir(), "saeflow-chart-"));
  const dir = join(root, "saeflow");
  cpSync(CHART, dir, { recursive: true });
  const nats = join(dir, "charts/nats");
  mkdirSync(join(nats, "templates"), { recursive: true });
  writeFileSync(join(nats, "Chart.yaml"), "apiVersion: v2\nname: nats\nversion: 1.2.0\n");
  writeFileSync(join(nats, "templates/standin.yaml"), "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: nats-standin\n");
  cpSync(join(dir, "templates/NOTES.txt"), join(dir, "notes-under-test.txt"));
  writeFileSync(
    join(dir, "templates/notes-under-test.yaml"),
    'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes-under-test\ndata:\n  notes: {{ tpl (.Files.Get "notes-under-test.txt") . | quote }}\n',
  );
  return { dir, close: () => rmSync(root, { recursive: true, force: true }) };
}

export interface K8sObject {
  apiVersion: string;
  kind: string;
  metadata: { name: string; labels?: Record<string, string>; annotations?: Record<string, string> };
  [key: string]: unknown;
}

export function parseManifests(text: string): K8sObject[] {
  return parseAllDocuments(text)
    .map((d) => d.toJS() as K8sObject | null)
    .filter((o): o is K8sObject => o !== null);
}

const MODELS: Record<string, new (data: never) => { validate(): void }> = {
  "v1/ConfigMap": ConfigMap,
  "v1/Service": Service,
  "v1/PersistentVolumeClaim": PersistentVolumeClaim,
  "batch/v1/Job": Job,
};

/** Validates against the Kubernetes OpenAPI schemas (kubernetes-models); throws naming the object. */
export function validateObject(obj: K8sObject): void {
  const Model = MODELS[`${obj.apiVersion}/${obj.kind}`];
  if (!Model) throw new Error(`${obj.kind} ${obj.metadata.name}: no schema for ${obj.apiVersion}/${obj.kind}`);
  try {
    new Model(obj as never).validate();
  } catch (err) {
    throw new Error(`${obj.kind} ${obj.metadata.name}: ${(err as Error).message}`, { cause: err });
  }
}
