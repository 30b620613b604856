import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import type { IJob } from "kubernetes-models/batch/v1";
import type { IConfigMap, IContainer, IService } from "kubernetes-models/v1";
import { parse as parseYaml } from "yaml";
import { loadConfig } from "../../services/common/config/index.js";
import { helm, type K8sObject, offlineChart, parseManifests, validateObject } from "../deploy/chart.js";

/**
 * The chart's side of security: gRPC TLS and NATS credentials and TLS from Kubernetes Secrets,
 * probes that still reach the roles, and values that cannot work refused by name.
 */
const ROLES = ["buffer", "producer", "trainer"] as const;

const SECURED = [
  "config.transport.tls.mode=mtls",
  "tls.grpcSecrets.buffer=rel-buffer-tls",
  "tls.grpcSecrets.producer=rel-producer-tls",
  "tls.grpcSecrets.trainer=rel-trainer-tls",
  "natsAuth.secret=rel-nats-creds",
  "natsAuth.tokenKey=token",
  "natsAuth.tlsSecret=rel-nats-tls",
  "natsAuth.tlsClientCert=true",
];

let chart: ReturnType<typeof offlineChart>;
before(() => {
  chart = offlineChart();
});
after(() => chart.close());

function render(sets: string[]): { code: number; stderr: string; objects: K8sObject[] } {
  const r = helm(["template", "rel", chart.dir, ...sets.flatMap((s) => ["--set", s])]);
  return { code: r.code, stderr: r.stderr, objects: r.code === 0 ? parseManifests(r.stdout) : [] };
}

const named = <T>(objects: K8sObject[], kind: string, name: string): T => {
  const o = objects.find((x) => x.kind === kind && x.metadata.name === name);
  assert.ok(o, `no ${kind} ${name}`);
  return o as unknown as T;
};
const container = (objects: K8sObject[], role: string): IContainer =>
  named<IJob>(objects, "Job", `rel-saeflow-${role}`).spec!.template.spec!.containers[0]!;
/** A container's environment as the kubelet makes it for the pod of completion index 0: $(NAME) expanded. */
function envOf(c: IContainer): NodeJS.ProcessEnv {
  const env: Record<string, string> = {};
  for (const e of c.env ?? []) {
    if (e.valueFrom?.fieldRef?.fieldPath.includes("job-completion-index")) env[e.name] = "0";
    else if (e.value !== undefined) env[e.name] = e.value.replace(/\$\((\w+)\)/g, (ref, name: string) => env[name] ?? ref);
  }
  return env;
}

describe("the chart under TLS and NATS credentials", () => {
  it("mounts each role's own Secret and gives every role the same keys, which the services' loader reads", () => {
    const r = render(SECURED);
    assert.equal(r.code, 0, r.stderr);
    for (const o of r.objects) validateObject(o);
    const base = parseYaml(named<IConfigMap>(r.objects, "ConfigMap", "rel-saeflow-run").data!["run.yaml"]!) as unknown;
    for (const role of ROLES) {
      const c = container(r.objects, role);
      const config = loadConfig({ base, env: envOf(c) });
      assert.deepEqual(
        [config.transport.tls.mode, config.transport.tls.cert, config.transport.tls.key, config.transport.tls.ca],
        ["mtls", "/etc/saeflow/grpc-tls/tls.crt", "/etc/saeflow/grpc-tls/tls.key", "/etc/saeflow/grpc-tls/ca.crt"],
        role,
      );
      assert.equal(config.transport.tls.healthAddress, "0.0.0.0:8086");
      assert.deepEqual(
        [config.nats.tokenFile, config.nats.tls.ca, config.nats.tls.cert, config.nats.tls.key],
        ["/etc/saeflow/nats-auth/token", "/etc/saeflow/nats-tls/ca.crt", "/etc/saeflow/nats-tls/tls.crt", "/etc/saeflow/nats-tls/tls.key"],
      );
      const volumes = named<IJob>(r.objects, "Job", `rel-saeflow-${role}`).spec!.template.spec!.volumes!;
      const secretOf = (name: string) => volumes.find((v) => v.name === name)?.secret?.secretName;
      assert.deepEqual(
        [secretOf("grpc-tls"), secretOf("nats-auth"), secretOf("nats-tls")],
        [`rel-${role}-tls`, "rel-nats-creds", "rel-nats-tls"],
      );
      const mounts = Object.fromEntries(c.volumeMounts!.map((m) => [m.name, m.mountPath]));
      assert.deepEqual(
        [mounts["grpc-tls"], mounts["nats-auth"], mounts["nats-tls"]],
        ["/etc/saeflow/grpc-tls", "/etc/saeflow/nats-auth", "/etc/saeflow/nats-tls"],
      );
    }
  });

  it("points the kubelet's gRPC probes at the plaintext health port, since they cannot speak TLS", () => {
    const r = render([...SECURED, "tls.healthPort=9000"]);
    for (const role of ROLES) {
      const c = container(r.objects, role);
      assert.deepEqual(
        c.ports!.map((p) => [p.name, p.containerPort]),
        [
          ["grpc", Number(c.ports![0]!.containerPort)],
          ["health", 9000],
        ],
      );
      for (const probe of [c.startupProbe, c.livenessProbe, c.readinessProbe]) assert.equal(probe?.grpc?.port, 9000, role);
      assert.equal(loadConfig({ base: {}, env: envOf(c) }).transport.tls.healthAddress, "0.0.0.0:9000");
      // Buffers are an indexed set of shards, each with its own Service.
      const svc = named<IService>(r.objects, "Service", role === "buffer" ? "rel-saeflow-buffer-0" : `rel-saeflow-${role}`);
      assert.equal(svc.spec!.ports![0]!.appProtocol, undefined, "not h2c: the port speaks TLS");
    }
    const plain = render([]);
    for (const role of ROLES) {
      const c = container(plain.objects, role);
      assert.equal(c.startupProbe?.grpc?.port, c.ports![0]!.containerPort, "plaintext runs probe the gRPC port itself");
      assert.ok(!c.env!.some((e) => e.name.startsWith("SAEFLOW_TRANSPORT__TLS") || e.name.startsWith("SAEFLOW_NATS__")), role);
    }
  });

  it("prints grpcurl with -cacert, -cert and -key in the NOTES under TLS", () => {
    const notes = named<IConfigMap>(render(SECURED).objects, "ConfigMap", "notes-under-test").data!.notes!;
    assert.ok(
      notes.includes(
        "grpcurl -cacert ca.crt -cert operator.crt -key operator.key -authority rel-saeflow-buffer-0 localhost:50051 saeflow.buffer.v1.BufferService/Status",
      ),
      notes,
    );
    assert.ok(!notes.includes("-plaintext"), notes);
  });

  it("refuses values that cannot work, naming the key", () => {
    const cases: Array<[string[], RegExp]> = [
      [["config.transport.tls.mode=mtls", "tls.grpcSecrets.buffer=b"], /tls\.grpcSecrets\.producer: config\.transport\.tls\.mode is mtls/],
      [["natsAuth.secret=s", "natsAuth.tokenKey=t", "natsAuth.credsKey=c"], /natsAuth: set one of .* not tokenKey and credsKey/],
      [["natsAuth.secret=s"], /natsAuth\.secret: name the key that holds the credential/],
      [["natsAuth.tokenKey=t"], /natsAuth\.tokenKey: set natsAuth\.secret/],
      [["natsAuth.secret=s", "natsAuth.passwordKey=p"], /natsAuth\.passwordKey: a password needs its user/],
      [["config.transport.tls.mode=sometimes"], /mode/],
    ];
    for (const [sets, message] of cases) {
      const r = render(sets);
      assert.notEqual(r.code, 0, sets.join(" "));
      assert.match(r.stderr, message);
    }
  });
});
