import { ConfigError, type RunConfig } from "../common/config/index.js";
import { Serving } from "../common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../common/grpc/server.js";
import { type Bus, connectBus } from "../common/nats.js";
import { outcome, type Role, type RoleDeps, stderrLog } from "../common/role.js";
import { ProducerService, type StatusResponse } from "../gen/saeflow/producer/v1/producer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import { shardContexts } from "./dataset/contexts.js";
import { readOptionsOf } from "./dataset/sources.js";
import { Feeds, type FeedStatus } from "./feeds.js";
import { InFlightLedger } from "./in-flight.js";
import { FLUSH_MS, produceUntilDone } from "./loop.js";
import { checkAgainstRun, type Prepared, prepare } from "./prepare.js";
import { ProduceStep } from "./produce.js";
import { type ProducerControl, producerHandlers } from "./service.js";
import { openModelSession } from "./model-thread.js";
import type { ModelSession } from "./session.js";
import { ProducerProgress, producerStatus } from "./status.js";

export interface RunningProducer extends Role<StatusResponse> {
  /** producer.id, or producer-<shardIndex> when that is empty: the name it joins the run under. */
  readonly id: string;
  /** The buffer shards it feeds, with their streams and gates (Status's proto has no room for them yet). */
  shards(): FeedStatus[];
}

/** What start-up has made so far, let go in reverse order when a later step fails. */
class Acquired {
  private readonly closers: Array<() => Promise<unknown>> = [];

  add(close: () => Promise<unknown>): void {
    this.closers.unshift(close);
  }

  async close(): Promise<void> {
    // The failure that stopped start-up is what the caller must see, not a second one while letting go.
    for (const close of this.closers) await close().catch(() => undefined);
  }
}

/** The parts a running producer is made of, all open. */
interface Parts extends Prepared {
  id: string;
  model: ModelSession;
  bus: Bus;
  ownBus: boolean;
  feeds: Feeds;
  progress: ProducerProgress;
  ledger: InFlightLedger;
  server: RunningServer;
  status: () => StatusResponse;
}

/**
 * Pause/Resume answer with the state the operator's call leads to: PAUSED once the pass in flight is
 * out, RUNNING once the operator's hold is lifted. Whether the buffer is granting rows at the moment
 * is Status's paused_by_buffer, not the answer to Resume.
 */
function controlOf(feeds: Feeds, progress: ProducerProgress, status: () => StatusResponse): ProducerControl {
  return {
    status,
    pause: () => {
      feeds.setOperatorPaused(true);
      return progress.state === ServiceState.RUNNING ? ServiceState.PAUSED : progress.state;
    },
    resume: () => {
      feeds.setOperatorPaused(false);
      return progress.state === ServiceState.PAUSED ? ServiceState.RUNNING : progress.state;
    },
  };
}

/**
 * Opens the model, the NATS connection, a push stream per buffer shard it feeds, the control server,
 * and joins each of those shards, in that order: each step uses only what the ones before it made
 * (the control handlers included), and `made` holds what to let go should a later step fail.
 */
async function open(config: RunConfig, deps: RoleDeps, id: string, prepared: Prepared, made: Acquired): Promise<Parts> {
  const p = config.producer;
  const log = deps.log ?? stderrLog;
  const model = await openModelSession({ model: p.model, hookPoints: p.hookPoints, provider: p.executionProvider, threads: p.threads });
  made.add(() => model.close());
  checkAgainstRun(config, prepared.tokenizer, model);
  const bus =
    deps.bus ??
    (await connectBus({ url: config.nats.url, security: config.nats, name: id, log }).catch((err: Error) => {
      throw ConfigError.at("nats.url", `cannot connect to ${config.nats.url}: ${err.message}`);
    }));
  if (!deps.bus) made.add(() => bus.drain());
  const chunkRows = p.batchContexts * (p.contextLength - (p.prependBos && p.excludeBos ? 1 : 0));
  const ledger = new InFlightLedger(prepared.store, prepared.from, config.producer.hookPoints);
  // Saved now, so a crash before the first answer still resumes under this lineage.
  ledger.save();
  const feeds = new Feeds({
    config,
    id,
    chunkRows,
    rowsPerContext: chunkRows / p.batchContexts,
    lineage: prepared.from.lineage,
    ledger,
    flushMs: FLUSH_MS,
    log,
  });
  made.add(() => feeds.close());
  made.add(() => feeds.leaveAll());
  const progress = new ProducerProgress();
  const status = () =>
    producerStatus({
      id,
      producer: p,
      files: prepared.files,
      progress,
      delivered: () => ledger.delivered,
      pausedByBuffer: () => feeds.pausedByBuffer,
      feeds: () => feeds.status(),
    });
  const handlers = producerHandlers(controlOf(feeds, progress, status));
  const server = await startServer(deps.address ?? p.address, config.transport, [bind(ProducerService, handlers)]);
  made.add(() => server.close(0));
  await feeds.join(bus, server.address);
  return { ...prepared, id, model, bus, ownBus: !deps.bus, feeds, progress, ledger, server, status };
}

/**
 * Starts a producer: checks the config against the tokenizer, dataset and model (failing with the
 * key at fault), serves its control RPCs, joins the run over NATS, and produces while the buffer
 * grants rows. A failure at any step of start-up lets go of everything made before it.
 */
export async function startProducer(config: RunConfig, deps: RoleDeps = {}): Promise<RunningProducer> {
  const log = deps.log ?? stderrLog;
  const p = config.producer;
  const id = p.id || `producer-${p.shardIndex}`;
  const made = new Acquired();
  let parts: Parts;
  try {
    parts = await open(config, deps, id, prepare(config, id, log), made);
  } catch (err) {
    await made.close();
    throw err;
  }
  const { server, feeds, progress, ledger } = parts;
  const contexts = shardContexts(
    {
      files: parts.files,
      read: readOptionsOf(p, parts.tokenizer.vocabSize, log),
      shard: { index: p.shardIndex, count: p.shardCount },
      pack: {
        contextLength: p.contextLength,
        prependBos: p.prependBos,
        excludeBos: p.excludeBos,
        bosId: parts.tokenizer.bosId,
        padId: parts.tokenizer.padId,
      },
      encode: parts.tokenizer.encode,
      epochs: p.epochs,
    },
    parts.from,
  );
  server.health.set(Serving.SERVING);
  const where = feeds.list.map((f) => `${f.hooks.join(", ")} to ${f.shard.address}`).join("; ");
  log(`${id} serving control on ${server.address}, pushing ${where}`);
  const step = new ProduceStep({ config, id, model: parts.model, feeds, ledger, progress, log }, parts.from);
  const finished = outcome(produceUntilDone({ id, producer: p, contexts, feeds, step, ledger, progress, log }));

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      if (progress.state !== ServiceState.STOPPED) progress.state = ServiceState.DRAINING;
      feeds.stop();
      await finished;
      if (!(await feeds.drainStreams(FLUSH_MS)))
        log(`${id}: ${feeds.inFlight} chunks unanswered after ${FLUSH_MS} ms; they will be produced again on resume`);
      // Their shard may have kept them before it died; if so its ledger shows them accepted and not produced.
      if (ledger.unansweredLate > 0)
        log(`${id}: ${ledger.unansweredLate} chunks sent to shards that ended were never answered; their rows are not counted as produced`);
      ledger.save();
      await feeds.leaveAll();
      if (parts.ownBus) await parts.bus.drain();
      await contexts.return(undefined);
      server.health.set(Serving.NOT_SERVING);
      await server.close();
      await parts.model.close();
      progress.state = ServiceState.STOPPED;
    })());
  return { id, address: server.address, finished, status: parts.status, shards: () => feeds.status(), stop };
}
