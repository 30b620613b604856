import { serviceMain } from "../common/service-main.js";
import { startBuffer } from "./buffer.js";

/** `tsx services/buffer/main.ts --config FILE [--set key=value ...]`: serves until drained or SIGINT/SIGTERM. */
await serviceMain("buffer", startBuffer);
