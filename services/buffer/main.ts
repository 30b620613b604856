import { connectBus } from "../common/nats.js";
import { serviceMain } from "../common/service-main.js";
import { startBuffer } from "./service.js";

/** `tsx services/buffer/main.ts --config FILE [--set key=value ...]`: serves until drained or SIGINT/SIGTERM. */
await serviceMain("buffer", async (config) => {
  const bus = await connectBus({ url: config.nats.url, name: `buffer-${config.run.id}` });
  let running;
  try {
    running = await startBuffer({ config, bus });
  } catch (err) {
    await bus.close();
    throw err;
  }
  const { buffer } = running;
  return {
    banner: `serving ${running.address} for run ${config.run.id}: ${buffer.hooks.size} pool(s) of ${config.buffer.capacityRows} rows, ${(buffer.bytes / 2 ** 20).toFixed(0)} MiB allocated`,
    finished: buffer.stopped,
    stop: async () => {
      await running.close();
      await bus.close();
    },
  };
});
