import { create } from "@bufbuild/protobuf";
import type { RunConfig } from "../common/config/index.js";
import { Serving } from "../common/grpc/health.js";
import { bind, startServer } from "../common/grpc/server.js";
import { type Bus, connectBus } from "../common/nats.js";
import { outcome, type Role, type RoleDeps, stderrLog } from "../common/role.js";
import { BufferService, type StatusResponse, StatusResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ActivationBuffer } from "./activation-buffer.js";
import { Ingest } from "./ingest.js";
import { RefillCoordinator } from "./refill.js";
import { BatchServer } from "./serve.js";
import { bufferHandlers } from "./service.js";

export interface BufferDeps extends Omit<RoleDeps, "bus"> {
  /** null runs without NATS: producers are then held back by gRPC flow control alone (benches). */
  bus?: Bus | null;
  /** Largest single pool allocation, see PoolOptions (tests use small ones to cover segmented pools). */
  segmentBytes?: number;
}

export interface RunningBuffer extends Role<StatusResponse> {
  /** The pools, for in-process callers (tests, benches). */
  readonly buffer: ActivationBuffer;
}

/**
 * Starts a buffer: allocates every pool once, serves Push, Batches and the control RPCs, and runs
 * the NATS refill handshake. Finishes once drained empty; stop() ends streams and leaves at once.
 */
export async function startBuffer(config: RunConfig, deps: BufferDeps = {}): Promise<RunningBuffer> {
  const log = deps.log ?? stderrLog;
  const ownBus =
    deps.bus === undefined
      ? await connectBus({ url: config.nats.url, security: config.nats, name: `buffer-${config.run.id}`, log })
      : undefined;
  const bus = deps.bus ?? ownBus;
  const buffer = new ActivationBuffer({
    runId: config.run.id,
    seed: config.run.seed,
    config: config.buffer,
    segmentBytes: deps.segmentBytes,
  });
  const ingest = new Ingest(buffer);
  const refill = bus ? new RefillCoordinator({ bus, prefix: config.nats.subjectPrefix, buffer, ingest }) : undefined;
  const status = (): StatusResponse => create(StatusResponseSchema, buffer.status(refill?.producers() ?? []));
  let server;
  try {
    const handlers = bufferHandlers(buffer, ingest, new BatchServer(buffer), status);
    server = await startServer(deps.address ?? config.buffer.address, config.transport, [bind(BufferService, handlers)]);
  } catch (err) {
    buffer.close();
    await ownBus?.drain();
    throw err;
  }
  refill?.start();
  server.health.set(Serving.SERVING);
  const mib = (buffer.bytes / 2 ** 20).toFixed(0);
  log(
    `serving ${server.address} for run ${config.run.id}: ${buffer.hooks.size} pool(s) of ${config.buffer.capacityRows} rows, ${mib} MiB allocated`,
  );

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      server.health.set(Serving.NOT_SERVING);
      refill?.close();
      buffer.close();
      await server.close(2000);
      await ownBus?.drain();
    })());
  return { address: server.address, buffer, finished: outcome(buffer.closed()), status, stop };
}
