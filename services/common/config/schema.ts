import { z } from "zod";
import { BufferSection } from "./sections/buffer.js";
import { LaunchSection } from "./sections/launch.js";
import { ProducerSection } from "./sections/producer.js";
import { NatsSection, RunSection, TelemetrySection, TransportSection } from "./sections/run.js";
import { TrainerSection } from "./sections/trainer.js";

/**
 * The run config: one schema that is the documentation, the validator and the type. The CLI, every
 * service and the Helm chart's values.schema.json derive from it.
 */
export const RunConfigSchema = z
  .object({
    run: RunSection.prefault({}),
    nats: NatsSection.prefault({}),
    telemetry: TelemetrySection.prefault({}),
    transport: TransportSection.prefault({}),
    buffer: BufferSection.prefault({}),
    producer: ProducerSection.prefault({}),
    trainer: TrainerSection.prefault({}),
    launch: LaunchSection.prefault({}),
  })
  .strict()
  .superRefine((c, ctx) => {
    // Roles run in separate processes from one file; catch a file whose roles disagree at load time.
    const pools = new Set(c.buffer.hookPoints.map((h) => h.name));
    const known = [...pools].join(", ");
    for (const role of ["trainer", "producer"] as const) {
      c[role].hookPoints.forEach((h, i) => {
        if (!pools.has(h))
          ctx.addIssue({ code: "custom", path: [role, "hookPoints", i], message: `"${h}" has no pool in buffer.hookPoints (${known})` });
      });
    }
    if (c.producer.dtype !== c.buffer.dtype) {
      ctx.addIssue({
        code: "custom",
        path: ["producer", "dtype"],
        message: `${c.producer.dtype} differs from buffer.dtype ${c.buffer.dtype}`,
      });
    }
  });

export type RunConfig = z.infer<typeof RunConfigSchema>;
export type BufferConfig = RunConfig["buffer"];
export type ProducerConfig = RunConfig["producer"];
export type TrainerConfig = RunConfig["trainer"];
export type TransportConfig = RunConfig["transport"];
export type LaunchConfig = RunConfig["launch"];
export type GrpcTlsConfig = TransportConfig["tls"];
export type NatsConfig = RunConfig["nats"];
