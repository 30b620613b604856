import { chmodSync, chownSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { IJob } from "kubernetes-models/batch/v1";
import type { IConfigMap, IContainer, IPodSpec, IService, IVolume } from "kubernetes-models/v1";
import type { K8sObject } from "./chart.js";

/**
 * What the kubelet would do with the chart's pods, for running them as `buildah run` processes on
 * one machine: the container's args and env (downward-API index and $(VAR) references resolved),
 * its user and capabilities, and a host folder for each volume mount (ConfigMap files written out,
 * claims mapped to given folders, emptyDirs made fresh). The cluster's Service names resolve to
 * 127.0.0.1 on the ports the test gives them, in env and in ConfigMap files, since every process
 * shares the host's network.
 */

export interface Mount {
  source: string;
  target: string;
  readOnly: boolean;
}

export interface Probe {
  port: number;
  service: string;
}

export interface PodPlan {
  role: string;
  args: string[];
  env: Record<string, string>;
  /** uid:gid from the pod's securityContext. */
  user: string;
  capDrop: string[];
  mounts: Mount[];
  startup: Probe;
  readiness: Probe;
}

export interface Cluster {
  /** Rendered objects of one release. */
  objects: K8sObject[];
  /** Host folder standing for each PersistentVolumeClaim, by claim name. */
  claims: Record<string, string>;
  /** Host ports standing for Service host:port pairs ("<svc>:<port>" -> port on 127.0.0.1). */
  services: Record<string, number>;
  /** Where ConfigMap files and emptyDirs are made. */
  scratch: string;
}

/** The rendered Job of each role, by the `app.kubernetes.io/component` label. */
function jobs(objects: K8sObject[]): Map<string, IJob> {
  const out = new Map<string, IJob>();
  for (const o of objects)
    if (o.kind === "Job") out.set(o.metadata.labels?.["app.kubernetes.io/component"] ?? o.metadata.name, o as unknown as IJob);
  return out;
}

const COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']";

/** Env as the kubelet resolves it for completion index 0, Service addresses rewritten to loopback. */
function resolveEnv(c: IContainer, services: Record<string, number>): Record<string, string> {
  const env: Record<string, string> = {};
  for (const e of c.env ?? []) {
    const field = e.valueFrom?.fieldRef?.fieldPath;
    if (field === COMPLETION_INDEX) env[e.name] = "0";
    else if (field !== undefined || e.valueFrom)
      throw new Error(`${c.name}: env ${e.name} reads ${field ?? "a source"} this harness does not know`);
    else env[e.name] = (e.value ?? "").replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (ref, name: string) => env[name] ?? ref);
  }
  for (const key of Object.keys(env)) env[key] = toLoopback(env[key]!, services);
  return env;
}

/** `text` with every Service host:port in it rewritten to 127.0.0.1 and the port standing for it. */
function toLoopback(text: string, services: Record<string, number>): string {
  let out = text;
  for (const [from, port] of Object.entries(services)) {
    const name = new RegExp(`(?<![\\w.-])${from.replace(/[.]/g, "\\.")}(?!\\d)`, "g");
    out = out.replace(name, `127.0.0.1:${port}`);
  }
  return out;
}

/** The host folder standing for `volume` (or the file `subPath` in it), made as the kubelet makes it. */
function hostPath(cluster: Cluster, spec: IPodSpec, role: string, volume: IVolume, subPath: string | undefined): string {
  const fsGroup = spec.securityContext?.fsGroup;
  const own = (dir: string, mode: number) => {
    // fsGroup: the kubelet gives the pod's group the volume, group-writable, setgid.
    if (fsGroup !== undefined) chownSync(dir, 0, fsGroup);
    chmodSync(dir, mode);
    return dir;
  };
  if (volume.configMap) {
    const cm = cluster.objects.find((o) => o.kind === "ConfigMap" && o.metadata.name === volume.configMap!.name) as IConfigMap | undefined;
    if (!cm?.data) throw new Error(`${role}: volume ${volume.name} names ConfigMap ${volume.configMap.name}, which the release lacks`);
    const dir = join(cluster.scratch, role, `configmap-${volume.name}`);
    mkdirSync(dir, { recursive: true });
    // The run config names the buffer shards by their Services, as env does the other addresses.
    for (const [key, text] of Object.entries(cm.data)) writeFileSync(join(dir, key), toLoopback(text, cluster.services), { mode: 0o644 });
    return subPath ? join(dir, subPath) : dir;
  }
  if (volume.persistentVolumeClaim) {
    const dir = cluster.claims[volume.persistentVolumeClaim.claimName];
    if (!dir) throw new Error(`${role}: no host folder given for claim ${volume.persistentVolumeClaim.claimName}`);
    return own(dir, 0o2775);
  }
  if (volume.emptyDir) {
    const dir = join(cluster.scratch, role, `emptydir-${volume.name}`);
    mkdirSync(dir, { recursive: true });
    // emptyDir is world-writable, as the kubelet makes it.
    return own(dir, 0o777);
  }
  throw new Error(`${role}: volume ${volume.name} is of a kind this harness does not mount`);
}

export function podPlans(cluster: Cluster): Map<string, PodPlan> {
  const plans = new Map<string, PodPlan>();
  for (const [role, job] of jobs(cluster.objects)) {
    const spec = job.spec!.template.spec!;
    const c = spec.containers[0]!;
    const sc = spec.securityContext ?? {};
    if (sc.runAsUser === undefined) throw new Error(`${role}: the pod sets no runAsUser`);
    const mounts = (c.volumeMounts ?? []).map((m) => {
      const volume = spec.volumes?.find((v) => v.name === m.name);
      if (!volume) throw new Error(`${role}: mount ${m.name} has no volume`);
      return { source: hostPath(cluster, spec, role, volume, m.subPath), target: m.mountPath, readOnly: m.readOnly ?? false };
    });
    const probe = (p: IContainer["startupProbe"], kind: string): Probe => {
      if (!p?.grpc) throw new Error(`${role}: no gRPC ${kind} probe`);
      return { port: p.grpc.port, service: p.grpc.service ?? "" };
    };
    plans.set(role, {
      role,
      args: c.args ?? [],
      env: resolveEnv(c, cluster.services),
      user: `${sc.runAsUser}:${sc.runAsGroup ?? sc.runAsUser}`,
      capDrop: c.securityContext?.capabilities?.drop ?? [],
      mounts,
      startup: probe(c.startupProbe, "startup"),
      readiness: probe(c.readinessProbe, "readiness"),
    });
  }
  return plans;
}

/** "<service>:<port>" of every rendered Service, the names pods reach each other by. */
export function serviceAddresses(objects: K8sObject[]): string[] {
  return objects
    .filter((o) => o.kind === "Service")
    .flatMap((o) => ((o as unknown as IService).spec?.ports ?? []).map((p) => `${o.metadata.name}:${p.port}`));
}
