import { serviceMain } from "../common/service-main.js";
import { startProducer } from "./producer.js";

/**
 * `tsx services/producer/main.ts --config FILE [--set key=value ...]`. Runs one producer until its
 * shard is done, the run stops, or SIGINT/SIGTERM; then it finishes the chunk in flight, waits for
 * the buffer's answers, saves its position and leaves the run.
 */
await serviceMain("producer", startProducer, (config) => ({
  "saeflow.shard": `${config.producer.shardIndex}/${config.producer.shardCount}`,
}));
