import { createHash } from "node:crypto";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { trace } from "@opentelemetry/api";
import { ConfigError, type RunConfig } from "../common/config/index.js";
import { subjects } from "../common/coordination.js";
import { Serving } from "../common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../common/grpc/server.js";
import { type Bus, connectBus } from "../common/nats.js";
import { inSpan, traceparentOf } from "../common/telemetry.js";
import { DTYPE_BYTES, dtypeFromName, toTensor } from "../common/tensor-codec.js";
import { ActivationChunkSchema, type ActivationChunk, type PushResponse } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService, type StatusResponse, StatusResponseSchema } from "../gen/saeflow/producer/v1/producer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import { type Batch, makeBatch } from "./batch.js";
import { gatherRows } from "./convert.js";
import { shardContexts } from "./dataset/contexts.js";
import type { Context } from "./dataset/pack.js";
import { freshPosition, type Position, PositionStore } from "./dataset/position.js";
import { displayName, resolveSources, type SourceFile } from "./dataset/sources.js";
import { DemandGate } from "./demand.js";
import { producerHandlers } from "./service.js";
import { type ModelSession, openModelSession } from "./session.js";
import { PushStream } from "./stream.js";
import { loadTokenizer, type TextTokenizer } from "./tokenizer.js";

export interface ProducerOptions {
  log?: (line: string) => void;
  /** Where the control server binds instead of producer.address (tests use 127.0.0.1:0). */
  address?: string;
}

export interface RunningProducer {
  readonly id: string;
  /** The control server's bound address. */
  readonly address: string;
  /** Settles when production ends: shard exhausted, run stopped or stop() called; rejects on a fatal error. */
  readonly finished: Promise<void>;
  status(): StatusResponse;
  /** Stops after the chunk in flight, waits for its answers, saves the position, leaves the run, closes everything. */
  stop(): Promise<void>;
}

/** How long stop() waits for the buffer to answer chunks in flight. */
const FLUSH_MS = 10_000;
/** The position file is rewritten at most this often while running (and always on stop). */
const SAVE_EVERY_MS = 1000;
/** tokens_per_second is measured over this window. */
const RATE_WINDOW_MS = 10_000;

const tracer = trace.getTracer("saeflow.producer");
const configError = (key: string, message: string) => ConfigError.at(key, message);

/** A forward pass whose chunks are out: the position it completes and the answers it still awaits. */
interface InFlight {
  position: Position;
  unanswered: number;
}

/** Cross-checks that need the loaded tokenizer and model, each naming the key at fault. */
function checkAgainstRun(config: RunConfig, tokenizer: TextTokenizer, session: ModelSession): void {
  const p = config.producer;
  if (session.vocabSize !== undefined && tokenizer.vocabSize > session.vocabSize) {
    throw configError(
      "producer.tokenizer",
      `${tokenizer.source} has ${tokenizer.vocabSize} ids but the model's vocabulary is ${session.vocabSize}`,
    );
  }
  p.hookPoints.forEach((hook, i) => {
    const pool = config.buffer.hookPoints.find((h) => h.name === hook);
    if (pool && pool.dModel !== session.dModel) {
      throw configError(
        `producer.hookPoints.${i}`,
        `${hook} is ${session.dModel} wide in the model but its buffer pool has dModel ${pool.dModel}`,
      );
    }
  });
  const chunkBytes = p.batchContexts * p.contextLength * session.dModel * DTYPE_BYTES[dtypeFromName(p.dtype)];
  if (chunkBytes > config.transport.maxMessageBytes - (1 << 20)) {
    throw configError(
      "producer.batchContexts",
      `a chunk of ${p.batchContexts} contexts x ${p.contextLength} tokens x ${session.dModel} is ${chunkBytes} bytes, over transport.maxMessageBytes`,
    );
  }
}

function fingerprint(config: RunConfig, files: SourceFile[]): string {
  const p = config.producer;
  const what = [p.dataset, files.length, p.textSplit, p.textField, p.shardIndex, p.shardCount, p.tokenizer, p.contextLength, p.prependBos];
  return createHash("sha256").update(JSON.stringify(what)).digest("hex").slice(0, 16);
}

/**
 * Starts a producer: checks the config against the tokenizer, dataset and model (failing with the
 * key at fault), serves its control RPCs, joins the run over NATS, and produces while the buffer
 * grants rows. Usable in-process (tests, the CLI) and from main.ts.
 */
export async function startProducer(config: RunConfig, options: ProducerOptions = {}): Promise<RunningProducer> {
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const p = config.producer;
  const id = p.id || `producer-${p.shardIndex}`;
  const tokenizer = loadTokenizer(p.tokenizer);
  if (p.prependBos && tokenizer.bosId === undefined) {
    throw configError(
      "producer.prependBos",
      `${p.tokenizer} defines no BOS token (no bos_token in tokenizer_config.json); set producer.prependBos=false`,
    );
  }
  const files = resolveSources(p.dataset);
  const store = new PositionStore(p.stateFile || join(config.run.dir, `${id}.position.json`), fingerprint(config, files));
  const saved = p.resume ? store.load() : undefined;
  let delivered: Position = saved ?? freshPosition();
  if (saved)
    log(
      `producer ${id}: resuming at file ${saved.cursor.fileIndex} byte ${saved.cursor.offset} (epoch ${saved.cursor.epoch}, ${saved.contexts} contexts done)`,
    );

  let state = ServiceState.STARTING;
  const counters = { tokens: 0, rows: 0, bytes: 0 };
  const rate: Array<[number, number]> = [];
  const chunkRows = p.batchContexts * (p.contextLength - (p.prependBos && p.excludeBos ? 1 : 0));
  const control = {
    status: (): StatusResponse => {
      const now = Date.now();
      while (rate.length > 1 && rate[0]![0] < now - RATE_WINDOW_MS) rate.shift();
      const first = rate[0];
      const seconds = first ? (now - first[0]) / 1000 : 0;
      const cursor = delivered.cursor;
      return create(StatusResponseSchema, {
        state,
        producerId: id,
        hookPoints: p.hookPoints,
        tokens: BigInt(counters.tokens),
        rowsSent: BigInt(counters.rows * p.hookPoints.length),
        bytesSent: BigInt(counters.bytes),
        tokensPerSecond: first && seconds > 0 ? (counters.tokens - first[1]) / seconds : 0,
        position: {
          fileIndex: cursor.fileIndex,
          file: files[cursor.fileIndex] ? displayName(files[cursor.fileIndex]!.path) : "",
          documentsDone: BigInt(delivered.documentsDone),
          contexts: BigInt(delivered.contexts),
          exhausted: delivered.exhausted,
        },
        executionProvider: p.executionProvider,
        pausedByBuffer: gate.pausedByBuffer,
      });
    },
    // The answer is the state the call leads to; Status shows PAUSED once the pass in flight is out.
    pause: () => {
      gate.setOperatorPaused(true);
      return state === ServiceState.RUNNING ? ServiceState.PAUSED : state;
    },
    resume: () => {
      gate.setOperatorPaused(false);
      return state === ServiceState.PAUSED && gate.open ? ServiceState.RUNNING : state;
    },
  };

  const server: RunningServer = await startServer(options.address ?? p.address, config.transport, [
    bind(ProducerService, producerHandlers(control)),
  ]);
  const gate = new DemandGate(
    subjects(config.nats.subjectPrefix, config.run.id),
    { producerId: id, hookPoints: p.hookPoints, address: server.address, chunkRows },
    log,
    chunkRows / p.batchContexts,
  );
  let model: ModelSession | undefined;
  let bus: Bus;
  try {
    model = await openModelSession({ model: p.model, hookPoints: p.hookPoints, provider: p.executionProvider, threads: p.threads });
    checkAgainstRun(config, tokenizer, model);
    bus = await connectBus({ url: config.nats.url, name: id, log }).catch((err: Error) => {
      throw configError("nats.url", `cannot connect to ${config.nats.url}: ${err.message}`);
    });
  } catch (err) {
    await model?.release();
    await server.close(0);
    throw err;
  }
  server.health.set(Serving.SERVING);
  const dtype = dtypeFromName(p.dtype);

  // Answers come in order per stream; each pass's chunks complete its position in order too.
  const inFlight: InFlight[] = [];
  const passOf = new Map<string, InFlight>();
  const chunkKey = (hook: string, sequence: bigint) => `${hook}#${sequence}`;
  let lastSave = 0;
  const save = (force: boolean) => {
    if (!force && Date.now() - lastSave < SAVE_EVERY_MS) return;
    store.save(delivered);
    lastSave = Date.now();
  };
  const settle = () => {
    while (inFlight.length && inFlight[0]!.unanswered === 0) delivered = inFlight.shift()!.position;
    save(false);
  };
  const onAnswer = (chunk: ActivationChunk, _res: PushResponse) => {
    const key = chunkKey(chunk.hookPoint, chunk.sequence);
    const pass = passOf.get(key);
    passOf.delete(key);
    if (pass) pass.unanswered--;
    settle();
  };
  const stream = new PushStream({
    address: p.bufferAddress,
    transport: config.transport,
    maxInFlight: p.maxInFlightChunks,
    onAnswer,
    onReconnected: (resent) => {
      const rows = resent.filter((c) => c.hookPoint === p.hookPoints[0]).reduce((n, c) => n + (c.activations?.shape[0] ?? 0), 0);
      gate.rejoin(rows).catch((err: Error) => log(`producer ${id}: rejoining the run failed: ${err.message}`));
    },
    log,
  });
  await gate.join(bus);

  const nextSequence = new Map(p.hookPoints.map((h) => [h, delivered.nextSequence[h] ?? 0]));
  const contexts = shardContexts(
    {
      files,
      read: { textSplit: p.textSplit, textField: p.textField, log },
      shard: { index: p.shardIndex, count: p.shardCount },
      pack: {
        contextLength: p.contextLength,
        prependBos: p.prependBos,
        excludeBos: p.excludeBos,
        bosId: tokenizer.bosId,
        padId: tokenizer.padId,
      },
      encode: tokenizer.encode,
      epochs: p.epochs,
    },
    delivered,
  );

  const nextBatch = async (): Promise<Batch | undefined> => {
    const picked: Context[] = [];
    const want = Math.max(1, Math.min(p.batchContexts, gate.contextsAllowed));
    while (picked.length < want) {
      const next = await contexts.next();
      if (next.done) break;
      picked.push(next.value);
    }
    return picked.length ? makeBatch(picked, p.contextLength) : undefined;
  };

  const produce = (batch: Batch) =>
    inSpan(tracer, "producer.produce", { contexts: batch.contexts.length, tokens: batch.tokens, rows: batch.rows }, async () => {
      let traceparent = "";
      const outputs = await inSpan(tracer, "producer.forward", { tokens: batch.tokens, contexts: batch.contexts.length }, async (span) => {
        traceparent = traceparentOf(span);
        return model.run(batch.inputs);
      });
      const arrays = await inSpan(
        tracer,
        "producer.convert",
        { tokens: batch.tokens, rows: batch.rows, hook_points: p.hookPoints.length },
        async (span) => {
          const out = p.hookPoints.map((hook) => gatherRows(outputs.get(hook)!, batch.spans, batch.rows, model.dModel, dtype));
          span.setAttribute(
            "bytes",
            out.reduce((n, a) => n + a.byteLength, 0),
          );
          return out;
        },
      );
      const last = batch.contexts[batch.contexts.length - 1]!;
      const pass: InFlight = {
        position: { cursor: last.end, documentsDone: last.documentsDone, contexts: last.id + 1, exhausted: false, nextSequence: {} },
        unanswered: 0,
      };
      const chunks = p.hookPoints.map((hook, h) => {
        const sequence = nextSequence.get(hook)!;
        nextSequence.set(hook, sequence + 1);
        return create(ActivationChunkSchema, {
          runId: config.run.id,
          hookPoint: hook,
          producerId: id,
          sequence: BigInt(sequence),
          activations: toTensor(arrays[h]!, dtype, [batch.rows, model.dModel]),
          tokenIds: batch.tokenIds,
          contextIds: batch.contextIds,
          documentIds: batch.documentIds,
          traceparent,
        });
      });
      pass.position.nextSequence = Object.fromEntries(nextSequence);
      const bytes = arrays.reduce((n, a) => n + a.byteLength, 0);
      inFlight.push(pass);
      if (batch.rows === 0) return settle();
      pass.unanswered = chunks.length;
      await inSpan(tracer, "producer.push", { tokens: batch.tokens, rows: batch.rows * chunks.length, bytes }, async () => {
        for (const chunk of chunks) {
          passOf.set(chunkKey(chunk.hookPoint, chunk.sequence), pass);
          await stream.send(chunk);
        }
      });
      gate.sent(batch.rows);
      counters.tokens += batch.tokens;
      counters.rows += batch.rows;
      counters.bytes += bytes;
      rate.push([Date.now(), counters.tokens]);
    });

  const loop = async (): Promise<void> => {
    rate.push([Date.now(), 0]);
    try {
      for (;;) {
        // PAUSED while parked at the gate: paused by the buffer or an operator, or out of grant.
        if (!gate.open) state = ServiceState.PAUSED;
        if ((await gate.wait()) === "stop") break;
        state = ServiceState.RUNNING;
        const batch = await inSpan(tracer, "producer.tokenize", {}, async (span) => {
          const b = await nextBatch();
          span.setAttribute("tokens", b?.tokens ?? 0);
          return b;
        });
        if (!batch) {
          log(`producer ${id}: shard ${p.shardIndex}/${p.shardCount} done after ${p.epochs} epoch(s)`);
          await stream.flush(FLUSH_MS);
          delivered = { ...delivered, exhausted: true };
          save(true);
          break;
        }
        await produce(batch);
      }
    } finally {
      if (state !== ServiceState.DRAINING) state = ServiceState.STOPPED;
    }
  };
  const finished = loop();
  finished.catch(() => undefined);

  let stopping: Promise<void> | undefined;
  const stop = () =>
    (stopping ??= (async () => {
      if (state !== ServiceState.STOPPED) state = ServiceState.DRAINING;
      gate.stop();
      await finished.catch(() => undefined);
      if (!(await stream.flush(FLUSH_MS)))
        log(`producer ${id}: ${stream.inFlight} chunks unanswered after ${FLUSH_MS} ms; they will be produced again on resume`);
      save(true);
      await gate.leave();
      await stream.close();
      await bus.close();
      await contexts.return(undefined);
      await server.close();
      await model.release();
      state = ServiceState.STOPPED;
    })());

  return { id, address: server.address, finished, status: control.status, stop };
}
