import assert from "node:assert/strict";
import { join } from "node:path";
import type { IJob } from "kubernetes-models/batch/v1";
import type { IConfigMap, IContainer } from "kubernetes-models/v1";
import { parse as parseYaml } from "yaml";
import { helm, type K8sObject, parseManifests } from "./chart.js";

export const ROLES = ["buffer", "producer", "trainer"] as const;
export type Role = (typeof ROLES)[number];

export interface Rendered {
  objects: K8sObject[];
  get<T>(kind: string, name: string): T;
  job(role: Role): IJob;
  container(role: Role): IContainer;
  /** The run config every pod reads (the ConfigMap's run.yaml). */
  values: { config: unknown };
}

/** `helm template` of the chart copy at `chartDir`; value files are relative to it. */
export function render(chartDir: string, release: string, valueFiles: string[], sets: string[] = []): Rendered {
  const args = [
    "template",
    release,
    chartDir,
    ...valueFiles.flatMap((f) => ["-f", join(chartDir, f)]),
    ...sets.flatMap((s) => ["--set", s]),
  ];
  const r = helm(args);
  assert.equal(r.code, 0, `helm ${args.join(" ")} failed:\n${r.stderr}`);
  const objects = parseManifests(r.stdout);
  const get = <T>(kind: string, name: string): T => {
    const o = objects.find((x) => x.kind === kind && x.metadata.name === name);
    assert.ok(o, `no ${kind} ${name} among ${objects.map((x) => `${x.kind}/${x.metadata.name}`).join(", ")}`);
    return o as unknown as T;
  };
  const job = (role: Role) => get<IJob>("Job", `${release}-saeflow-${role}`);
  const container = (role: Role) => job(role).spec!.template.spec!.containers[0]!;
  const cm = get<IConfigMap>("ConfigMap", `${release}-saeflow-run`);
  return { objects, get, job, container, values: { config: parseYaml(cm.data!["run.yaml"]!) } };
}

/**
 * The env a container sees in the pod of completion index `index`, resolved as the kubelet does:
 * downward-API fields, and $(NAME) references to variables defined earlier in the list.
 */
export function podEnv(c: IContainer, index: number): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const e of c.env ?? []) {
    const field = e.valueFrom?.fieldRef?.fieldPath;
    if (field === "metadata.annotations['batch.kubernetes.io/job-completion-index']") env[e.name] = String(index);
    else if (field !== undefined) assert.fail(`${c.name}: env ${e.name} reads unhandled field ${field}`);
    else env[e.name] = (e.value ?? "").replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (ref, name: string) => env[name] ?? ref);
  }
  return env;
}
