import { create } from "@bufbuild/protobuf";
import type { RunConfig } from "../common/config/index.js";
import { Serving } from "../common/grpc/health.js";
import { bind, startServer } from "../common/grpc/server.js";
import { subjects } from "../common/coordination.js";
import { type Bus, connectBus } from "../common/nats.js";
import { shardsOf } from "../common/shards.js";
import { outcome, type Role, type RoleDeps, stderrLog } from "../common/role.js";
import { BufferService, type StatusResponse, StatusResponseSchema } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ActivationBuffer } from "./activation-buffer.js";
import { Ingest } from "./ingest.js";
import { RefillCoordinator } from "./refill.js";
import { RunEnd } from "./run-end.js";
import { BatchServer } from "./serve.js";
import { bufferHandlers } from "./service.js";
import { BufferStateFile } from "./state-file.js";

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
 * Starts a buffer (shard buffer.shard of buffer.shards): allocates its pools once, serves Push, Batches and the control RPCs, and runs
 * the NATS refill handshake. Finishes once drained empty; stop() ends streams and leaves at once.
 */
export async function startBuffer(config: RunConfig, deps: BufferDeps = {}): Promise<RunningBuffer> {
  const log = deps.log ?? stderrLog;
  const ownBus =
    deps.bus === undefined
      ? await connectBus({ url: config.nats.url, security: config.nats, name: `buffer-${config.run.id}`, log })
      : undefined;
  const bus = deps.bus ?? ownBus;
  let buffer: ActivationBuffer;
  try {
    buffer = new ActivationBuffer({
      runId: config.run.id,
      seed: config.run.seed,
      config: config.buffer,
      segmentBytes: deps.segmentBytes,
      stateFile: config.buffer.stateFile ? new BufferStateFile(config.buffer.stateFile, config.run.id) : undefined,
    });
  } catch (err) {
    await ownBus?.drain();
    throw err;
  }
  logRestored(buffer, config.buffer.stateFile, log);
  const ingest = new Ingest(buffer, config.transport.limits);
  const batches = new BatchServer(buffer);
  const refill = bus ? new RefillCoordinator({ bus, prefix: config.nats.subjectPrefix, buffer, log }) : undefined;
  const runEnd =
    bus && refill
      ? new RunEnd({
          bus,
          subjects: subjects(config.nats.subjectPrefix, config.run.id, buffer.shard.index),
          buffer,
          consumers: batches.consumers,
          expected: config.buffer.trainers,
          trainerHookPoints: config.trainer.hookPoints,
          producers: () => refill.producers(),
          log,
        })
      : undefined;
  const status = (): StatusResponse => create(StatusResponseSchema, buffer.status(refill?.producers() ?? []));
  // Listening on NATS before the port accepts: a producer whose stream comes back says hello
  // before re-sending, and a hello nobody answers yet would leave its re-sent rows outside the grant.
  refill?.start();
  runEnd?.start();
  let server;
  try {
    await bus?.flush();
    const handlers = bufferHandlers(buffer, ingest, batches, status);
    server = await startServer(deps.address ?? config.buffer.address, config.transport, [bind(BufferService, handlers)]);
  } catch (err) {
    runEnd?.close();
    refill?.close();
    buffer.close();
    await ownBus?.drain();
    throw err;
  }
  server.health.set(Serving.SERVING);
  const mib = (buffer.bytes / 2 ** 20).toFixed(0);
  const shards = shardsOf(config.buffer).length;
  const which = shards > 1 ? ` as shard ${buffer.shard.index} of ${shards} (${[...buffer.hooks.keys()].join(", ")})` : "";
  log(
    `serving ${server.address} for run ${config.run.id}${which}: ${buffer.hooks.size} pool(s) of ${config.buffer.capacityRows} rows, ${mib} MiB allocated`,
  );

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      server.health.set(Serving.NOT_SERVING);
      runEnd?.close();
      refill?.close();
      batches.consumers.close();
      buffer.close();
      await server.close(2000);
      await ownBus?.drain();
    })());
  return { address: server.address, buffer, finished: outcome(buffer.closed()), status, stop };
}

/** Says what a buffer took over from the one before it: rows its pool lost, and where the ledger stands. */
function logRestored(buffer: ActivationBuffer, stateFile: string, log: (line: string) => void): void {
  for (const h of buffer.hooks.values()) {
    const { accepted, lost } = h.accounting.balance(0);
    if (accepted === 0) continue;
    const { lost_with_buffer: died, left_at_stop: left } = h.accounting.dropped;
    log(
      `${h.name}: went on from the ledger in ${stateFile}: ${accepted} rows accepted so far, ${lost} lost with earlier buffers (${died} when one died, ${left} left in one that stopped)`,
    );
  }
}
