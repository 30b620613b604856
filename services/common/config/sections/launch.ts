import { z } from "zod";

/** How `saeflow up` lays a run out on one machine; ignored by the services themselves. */
export const LaunchSection = z
  .object({
    producers: z.number().int().positive().default(1).describe("Producer processes; each takes one shard of the dataset."),
    trainers: z
      .number()
      .int()
      .positive()
      .default(1)
      .describe("Trainer processes; each trains the configured sweep (ids trainer-0, trainer-1, ...)."),
    basePort: z
      .number()
      .int()
      .min(0)
      .max(65000)
      .default(0)
      .describe("First gRPC port (buffer, producers, trainers in order); 0 picks free ports."),
    producerNice: z
      .number()
      .int()
      .min(0)
      .max(19)
      .default(10)
      .describe(
        "Niceness added to producer processes (0 leaves them as the other roles). On cores the roles share, the trainer, which sets the pace, gets them first and producers what it leaves; they still refill the pool in time.",
      ),
    statusEveryMs: z.number().int().positive().default(1000).describe("How often the progress line and pipeline.jsonl are refreshed."),
    evaluate: z.boolean().default(true).describe("After training, measure each SAE's spliced LM loss (delta and fraction recovered)."),
    evalContexts: z.number().int().positive().default(16).describe("Contexts of the corpus used for the splice evaluation."),
    report: z.boolean().default(true).describe("Write report.html into the run folder when the run ends."),
    restarts: z
      .number()
      .int()
      .min(0)
      .default(3)
      .describe(
        "Times each role (and the nats-server saeflow up started) is restarted after it exits abnormally; it resumes (trainers from their newest checkpoint, producers from their saved position, the buffer from its state file). Spent, the run stops with an error.",
      ),
    watchdogMs: z
      .number()
      .int()
      .positive()
      .default(30000)
      .describe("After this long without a trainer step, and as often again while it lasts, saeflow up says who waits for what."),
  })
  .strict();
