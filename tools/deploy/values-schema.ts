import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { RunConfigSchema } from "../../services/common/config/index.js";

/**
 * Writes deploy/helm/saeflow/values.schema.json. `config` is the run config schema itself, so helm
 * refuses a bad run config before any pod starts, with the same rules the services apply; the other
 * keys describe the deployment. Run: npx tsx tools/deploy/values-schema.ts
 */

export const VALUES_SCHEMA_PATH = fileURLToPath(new URL("../../deploy/helm/saeflow/values.schema.json", import.meta.url));

const quantity = z
  .string()
  .regex(/^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$/, "expected a Kubernetes quantity such as 500m, 4Gi")
  .or(z.number().positive());
const resources = z
  .object({
    requests: z.record(z.string(), quantity).optional(),
    limits: z.record(z.string(), quantity).optional(),
  })
  .strict()
  .describe("Kubernetes resources of the container (cpu, memory, ephemeral-storage).");
/** Kubernetes objects passed through to the pod spec; the API server validates their inside. */
const k8sObject = z.object({}).loose();
/** Exactly one volume source (persistentVolumeClaim, nfs, hostPath, csi, image, ...), as in a pod's `volumes` entry without `name`. */
const volumeSource = k8sObject.meta({ minProperties: 1, maxProperties: 1 });

const placement = {
  nodeSelector: z.record(z.string(), z.string()).describe("Node labels the pods must match."),
  tolerations: z.array(k8sObject).describe("Taints the pods tolerate (e.g. nvidia.com/gpu:NoSchedule)."),
  affinity: k8sObject.describe("Pod affinity and anti-affinity rules."),
  podAnnotations: z.record(z.string(), z.string()).describe("Extra annotations on the pods."),
  env: z.array(k8sObject).describe("Extra container env vars, e.g. SAEFLOW_PRODUCER__THREADS to override one config key for this role."),
  terminationGracePeriodSeconds: z.number().int().min(0).describe("Time a pod gets after SIGTERM to finish what it accepted."),
  startupSeconds: z
    .number()
    .int()
    .min(10)
    .describe("How long the pod may stay NOT_SERVING at start (model load, pool allocation) before it is replaced."),
  backoffLimit: z
    .number()
    .int()
    .min(0)
    .describe("Failed pods of this role's Job before the Job, and so the run, fails; a bad config (exit code 2) fails it at once."),
};
const port = z.number().int().min(1).max(65535).describe("gRPC port of the role (health, reflection, control RPCs).");
const replicas = z.number().int().min(1);
const gpu = z.number().int().min(0).describe("nvidia.com/gpu per pod; above 0 the pod runs the cuda image variant.");

export const ChartValues = z
  .object({
    config: RunConfigSchema.describe("The run config, rendered verbatim into the ConfigMap as the YAML every role reads with --config."),
    nameOverride: z.string().describe("Replaces the chart name in object names."),
    fullnameOverride: z.string().describe("Replaces <release>-<chart> in object names."),
    image: z
      .object({
        repository: z.string().min(1).describe("Image built from deploy/docker/Dockerfile."),
        tag: z.string().describe("Tag prefix; empty uses the chart's appVersion. Pods run <tag>-cpu or <tag>-cuda."),
        pullPolicy: z.enum(["Always", "IfNotPresent", "Never"]).describe("Image pull policy."),
      })
      .strict(),
    imagePullSecrets: z.array(z.object({ name: z.string().min(1) }).strict()).describe("Secrets for a private registry."),
    buffer: z
      .object({
        port: port.describe("gRPC port of every buffer shard and of its Service <release>-saeflow-buffer-<index>."),
        cpu: quantity.describe("CPU request of the buffer."),
        memoryOverheadMiB: z
          .number()
          .int()
          .min(0)
          .describe("Memory on top of the pools (Node runtime, chunks and batches in flight); the pools' size comes from config.buffer."),
        ...placement,
        backoffLimit: placement.backoffLimit.describe(
          "Failed pods of one buffer shard before that shard gives up (each shard counts its own); a bad config (exit code 2) fails the Job at once.",
        ),
      })
      .strict(),
    producer: z
      .object({
        replicas: replicas.describe("Producers; each reads shard <completion index> of <replicas> of the dataset."),
        port,
        gpu,
        resources,
        ...placement,
      })
      .strict(),
    trainer: z
      .object({
        replicas: replicas.describe(
          "Trainers, with ids trainer-<completion index>; trainer i trains the hook points of config.trainer.hookPoints at positions p with p % replicas == i.",
        ),
        port,
        gpu,
        resources,
        ...placement,
      })
      .strict(),
    persistence: z
      .object({
        enabled: z
          .boolean()
          .describe("Keep run.dir (checkpoints, exports, metrics) on a volume claim; off uses an emptyDir that dies with the pod."),
        existingClaim: z.string().describe("Use this claim instead of creating one."),
        size: quantity.describe("Size of the created claim."),
        storageClass: z.string().describe("Storage class of the created claim; empty uses the cluster default."),
        accessModes: z
          .array(z.enum(["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]))
          .min(1)
          .describe("Access modes of the created claim; ReadWriteMany when roles on several nodes mount it."),
        mountPath: z
          .string()
          .regex(/^\/[^\s]*$/, "expected an absolute path")
          .describe("Where run.dir's volume is mounted; run.dir becomes <mountPath>/<run.id>."),
        roles: z
          .array(z.enum(["buffer", "producer", "trainer"]))
          .describe("Roles that mount the claim; the others write run.dir to an emptyDir."),
      })
      .strict(),
    modelVolume: volumeSource.describe("Volume source holding the ONNX model and tokenizer, mounted read-only at /models on producers."),
    datasetVolume: k8sObject
      .meta({ maxProperties: 1 })
      .describe("Volume source holding the text dataset, mounted read-only at /datasets on producers; {} for none."),
    nats: z
      .object({
        deploy: z
          .boolean()
          .describe("Deploy NATS with the official chart (run `helm dependency update` first); false uses config.nats.url."),
      })
      .loose()
      .describe("deploy, plus values passed to the NATS chart."),
    tls: z
      .object({
        caSecret: z
          .string()
          .describe(
            "Secret holding a CA bundle that NATS (tls://) and OTLP (https://) servers are verified against; empty trusts the system CAs.",
          ),
        caKey: z.string().min(1).describe("Key of the CA bundle in caSecret."),
        grpcSecrets: z
          .object({
            buffer: z.string(),
            producer: z.string(),
            trainer: z.string(),
          })
          .strict()
          .describe(
            "Per role, the Secret (tls.crt, tls.key, ca.crt) its pods mount at /etc/saeflow/grpc-tls when config.transport.tls.mode is tls or mtls.",
          ),
        healthPort: z
          .number()
          .int()
          .min(1)
          .max(65535)
          .describe("Plaintext port serving only grpc.health.v1 while gRPC is under TLS, for the kubelet's gRPC probes."),
      })
      .strict(),
    natsAuth: z
      .object({
        secret: z.string().describe("Secret holding the NATS credential, mounted at /etc/saeflow/nats-auth; empty connects without one."),
        passwordKey: z.string().describe("Key of the password of config.nats.user in secret."),
        tokenKey: z.string().describe("Key of the NATS token in secret."),
        credsKey: z.string().describe("Key of a NATS .creds file in secret."),
        nkeyKey: z.string().describe("Key of an nkey seed in secret."),
        tlsSecret: z
          .string()
          .describe("Secret with the NATS server's ca.crt, mounted at /etc/saeflow/nats-tls; the roles then speak TLS to NATS."),
        tlsClientCert: z.boolean().describe("Also present tls.crt and tls.key of tlsSecret, for a NATS server that verifies clients."),
      })
      .strict(),
    global: k8sObject.optional().describe("Helm's values shared with subcharts."),
  })
  .strict();

type JsonObject = { properties: Record<string, JsonObject>; required?: string[]; items?: JsonObject; description?: string };

/**
 * The chart sizes the buffer pod's memory from the pools (rows x widths x dtype bytes), so these keys,
 * optional for the CLI, must be written out in the values; helm cannot see the run config's defaults.
 */
const SIZING_KEYS = ["dtype", "hookPoints", "capacityRows"];

const SHARD_ADDRESS = "Set by the chart to this shard's Service, <release>-saeflow-buffer-<index>:<buffer.port>; leave it out.";

/** The JSON schema helm applies to the chart's values (draft-07, the dialect helm 3 validates). */
export function valuesSchema(): Record<string, unknown> {
  const schema = z.toJSONSchema(ChartValues, { io: "input", target: "draft-7" }) as unknown as JsonObject;
  const config = schema.properties.config!;
  config.required = [...(config.required ?? []), "buffer"];
  const buffer = config.properties.buffer!;
  buffer.required = [...(buffer.required ?? []), ...SIZING_KEYS];
  // The chart gives each shard its Service's address; a shard in the values names its pools only.
  const shard = buffer.properties.shards!.items!;
  shard.required = (shard.required ?? []).filter((k) => k !== "address");
  shard.properties.address!.description = SHARD_ADDRESS;
  return { ...schema, title: "saeflow chart values" };
}

export const valuesSchemaText = (): string => `${JSON.stringify(valuesSchema(), null, 2)}\n`;

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(VALUES_SCHEMA_PATH, valuesSchemaText());
  process.stdout.write(`wrote ${VALUES_SCHEMA_PATH}\n`);
}
