import { z } from "zod";
import { LimitsSection } from "./limits.js";
import { checkNatsCredentials, GrpcTlsSection, natsCredentials, NatsTlsSection } from "./security.js";

/** Identity of a run and where it writes; shared by every role. */
export const RunSection = z
  .object({
    id: z
      .string()
      .regex(/^[A-Za-z0-9._-]{1,64}$/)
      .default("local")
      .describe("Run id; every chunk, subject and folder carries it."),
    dir: z.string().min(1).default("runs/local").describe("Run folder: checkpoints, exports, metrics.jsonl, report."),
    seed: z.number().int().min(0).default(0).describe("Base seed; each role derives its own from it."),
  })
  .strict();

/** NATS connection for the pause/refill handshake and membership. */
export const NatsSection = z
  .object({
    url: z.string().min(1).default("nats://127.0.0.1:4222").describe("NATS server URL (NATS_URL overrides)."),
    subjectPrefix: z
      .string()
      .regex(/^[A-Za-z0-9_-]+$/)
      .default("saeflow")
      .describe("First token of every subject."),
    ...natsCredentials,
    tls: NatsTlsSection.prefault({}),
  })
  .strict()
  .superRefine(checkNatsCredentials);

/** OpenTelemetry export. */
export const TelemetrySection = z
  .object({
    otlpEndpoint: z
      .string()
      .default("")
      .describe("OTLP/HTTP endpoint, e.g. http://127.0.0.1:4318; empty disables export (OTEL_EXPORTER_OTLP_ENDPOINT overrides)."),
    metricsIntervalMs: z.number().int().positive().default(5000).describe("How often metrics are exported."),
  })
  .strict();

/** gRPC transport tuning shared by every server and client. */
export const TransportSection = z
  .object({
    maxMessageBytes: z
      .number()
      .int()
      .min(4 << 20)
      .default(256 << 20)
      .describe("Largest gRPC message accepted; must exceed the largest chunk or batch."),
    flowControlWindowBytes: z
      .number()
      .int()
      .min(65535)
      .default(64 << 20)
      .describe("HTTP/2 stream and connection window; large windows lift a stream from ~0.3 to ~1 GB/s."),
    keepaliveMs: z.number().int().positive().default(30000).describe("Keepalive ping interval on idle connections."),
    limits: LimitsSection.prefault({}),
    tls: GrpcTlsSection.prefault({}),
  })
  .strict();
