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
  .strict();

export type RunConfig = z.infer<typeof RunConfigSchema>;
export type BufferConfig = RunConfig["buffer"];
export type ProducerConfig = RunConfig["producer"];
export type TrainerConfig = RunConfig["trainer"];
export type TransportConfig = RunConfig["transport"];
export type LaunchConfig = RunConfig["launch"];
