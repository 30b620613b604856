import { serviceMain } from "../common/service-main.js";
import { startTrainer } from "./trainer.js";

/**
 * `tsx services/trainer/main.ts --config FILE [--set key=value ...]`: trains until `steps`, the end of
 * the buffer's stream or a Stop RPC (checkpoint and export), or SIGINT/SIGTERM (checkpoint only; the
 * next start resumes from it).
 */
await serviceMain("trainer", startTrainer, (config) => ({ "saeflow.trainer_id": config.trainer.id }));
