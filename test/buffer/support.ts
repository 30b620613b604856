import { create, type MessageInitShape } from "@bufbuild/protobuf";
import type { ClientDuplexStream } from "@grpc/grpc-js";
import type { Subscription } from "@nats-io/transport-node";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { Demand, HEARTBEAT_MS, MemberAnnounce, subjects, type Subjects } from "../../services/common/coordination.js";
import { createClient, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import { type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";
import { fromTensor, toTensor } from "../../services/common/tensor-codec.js";
import { type RunningBuffer, startBuffer } from "../../services/buffer/buffer.js";
import {
  type BatchesRequestSchema,
  type BatchesResponse,
  BufferService,
  type PushRequest,
  PushRequestSchema,
  type PushResponse,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

/**
 * Real parts for the buffer's tests: a nats-server on 127.0.0.1, the buffer's gRPC server on a
 * loopback port, and producers and trainers as plain gRPC (and NATS) clients.
 */
export const HOOK = "blocks.1.hook_resid_post";
export const D_MODEL = 16;

export interface Harness {
  config: RunConfig;
  nats: NatsServer;
  running: RunningBuffer;
  client: ServiceClient<typeof BufferService>;
  subjects: Subjects;
  close(): Promise<void>;
}

/** Starts nats-server and a buffer with a small pool (1024 rows of 16 fp32) unless `sets` say otherwise. */
export async function startHarness(sets: string[] = []): Promise<Harness> {
  const nats = await startNatsServer();
  try {
    const config = loadConfig({
      sets: [
        "run.id=test",
        `nats.url=${nats.url}`,
        `buffer.hookPoints=[{name: ${HOOK}, dModel: ${D_MODEL}}]`,
        "buffer.capacityRows=1024",
        `trainer.hookPoints=[${HOOK}]`,
        ...sets,
      ],
    });
    const bus = await connectBus({ url: nats.url, name: "buffer" });
    const running = await startBuffer(config, { bus, address: "127.0.0.1:0", log: () => undefined });
    const client = createClient(BufferService, running.address, config.transport);
    return {
      config,
      nats,
      running,
      client,
      subjects: subjects(config.nats.subjectPrefix, config.run.id, config.buffer.shard),
      close: async () => {
        client.close();
        await running.stop();
        await bus.drain();
        await nats.stop();
      },
    };
  } catch (err) {
    await nats.stop();
    throw err;
  }
}

/**
 * Row r of context c from producer p holds [c, r, p, 1, 1, ...]: a trainer can check that every row
 * it got is whole and matches its ids.
 */
export function makeChunk(options: {
  producerId: string;
  producerNumber: number;
  sequence: number;
  contexts: number[];
  rowsPerContext: number;
  hookPoint?: string;
  dModel?: number;
  runId?: string;
  poison?: number;
}): MessageInitShape<typeof PushRequestSchema> {
  const width = options.dModel ?? D_MODEL;
  const rows = options.contexts.length * options.rowsPerContext;
  const values = new Float32Array(rows * width).fill(1);
  const contextIds: number[] = [];
  const tokenIds: number[] = [];
  options.contexts.forEach((c, ci) => {
    for (let r = 0; r < options.rowsPerContext; r++) {
      const row = ci * options.rowsPerContext + r;
      values[row * width] = c;
      values[row * width + 1] = r;
      values[row * width + 2] = options.producerNumber;
      contextIds.push(c);
      tokenIds.push(1000 + r);
    }
  });
  if (options.poison !== undefined) values[options.poison * width + 3] = NaN;
  return {
    chunk: {
      runId: options.runId ?? "test",
      hookPoint: options.hookPoint ?? HOOK,
      producerId: options.producerId,
      sequence: BigInt(options.sequence),
      activations: toTensor(values, DType.FP32, [rows, width]),
      contextIds,
      tokenIds,
    },
  };
}

/** One Push stream: send() resolves with the chunk's answer (answers come in order). */
export class PushClient {
  private readonly call: ClientDuplexStream<PushRequest, PushResponse>;
  private readonly waiting: Array<{ resolve: (r: PushResponse) => void; reject: (e: Error) => void }> = [];
  /** Settles with the stream's end: resolves on OK, rejects with the status error. */
  readonly ended: Promise<void>;

  constructor(client: ServiceClient<typeof BufferService>) {
    this.call = client.push();
    this.call.on("data", (r: PushResponse) => this.waiting.shift()?.resolve(r));
    this.ended = new Promise<void>((resolve, reject) => {
      this.call.on("error", (err: Error) => {
        for (const w of this.waiting.splice(0)) w.reject(err);
        reject(err);
      });
      this.call.on("status", (s: { code: number }) => {
        if (s.code === 0) resolve();
      });
    });
    this.ended.catch(() => undefined);
  }

  send(request: MessageInitShape<typeof PushRequestSchema>): Promise<PushResponse> {
    return new Promise((resolve, reject) => {
      this.waiting.push({ resolve, reject });
      this.call.write(create(PushRequestSchema, request));
    });
  }

  async end(): Promise<void> {
    this.call.end();
    await this.ended;
  }

  /** Cuts the stream: chunks not answered yet are rejected. */
  cancel(): void {
    this.call.cancel();
  }
}

/** Collects a Batches stream until it ends. */
export async function collectBatches(
  client: ServiceClient<typeof BufferService>,
  request: MessageInitShape<typeof BatchesRequestSchema>,
): Promise<BatchesResponse[]> {
  const out: BatchesResponse[] = [];
  for await (const batch of client.batches({ hookPoint: HOOK, includeIds: true, ...request }) as AsyncIterable<BatchesResponse>)
    out.push(batch);
  return out;
}

/** Checks that each row of a batch holds what its context id says (see makeChunk). */
export function rowsMatchIds(batch: BatchesResponse, width = D_MODEL): boolean {
  const values = fromTensor(batch.activations!);
  return batch.contextIds.every((c, i) => values[i * width] === c && values[i * width + 1] === batch.tokenIds[i]! - 1000);
}

/**
 * A producer as a plain client: joins over NATS (hello, heartbeats), keeps the latest Demand, and
 * pushes whole chunks of `contextsPerChunk` contexts only within its credit.
 */
export class TestProducer {
  demand: Demand | undefined;
  readonly demands: Demand[] = [];
  sent = 0;
  readonly answers: PushResponse[] = [];
  private sequence = 0;
  private nextContext = 0;
  private bus: Bus | undefined;
  private push: PushClient | undefined;
  private sub: Subscription | undefined;
  private heartbeat: NodeJS.Timeout | undefined;
  private waiters: Array<() => void> = [];
  readonly announce: MemberAnnounce;

  constructor(
    private readonly harness: Harness,
    readonly id: string,
    private readonly number: number,
    private readonly rowsPerContext = 64,
    private readonly contextsPerChunk = 1,
  ) {
    this.announce = { producerId: id, hookPoints: [HOOK], address: "", chunkRows: rowsPerContext * contextsPerChunk };
  }

  get chunkRows(): number {
    return this.rowsPerContext * this.contextsPerChunk;
  }

  get credit(): number {
    if (this.demand?.command !== "refill") return 0;
    return (this.demand.grants[this.id] ?? 0) - this.sent;
  }

  async join(): Promise<void> {
    const bus = (this.bus = await connectBus({ url: this.harness.nats.url, name: this.id }));
    this.sub = bus.subscribe(this.harness.subjects.demand, Demand, (d) => this.apply(d));
    this.heartbeat = setInterval(() => bus.publish(this.harness.subjects.heartbeat, MemberAnnounce, this.announce), HEARTBEAT_MS);
    this.apply(await bus.request(this.harness.subjects.hello, MemberAnnounce, this.announce, Demand, 5000));
    this.push ??= new PushClient(this.harness.client);
  }

  /**
   * Pushes `chunks` chunks before joining, as a producer re-sending to a restarted buffer that has not
   * heard its hello yet; they count as sent, as the producer counts its re-sent rows.
   */
  async pushBeforeJoining(chunks: number): Promise<void> {
    this.push ??= new PushClient(this.harness.client);
    this.answers.push(...(await Promise.all(Array.from({ length: chunks }, () => this.pushChunk()))));
  }

  /** One heartbeat saying every row sent was answered (MemberAnnounce.settled); call with nothing in flight. */
  announceSettled(): void {
    this.bus!.publish(this.harness.subjects.heartbeat, MemberAnnounce, { ...this.announce, settled: this.sent });
  }

  /** Stops heartbeats without leaving: the buffer should let it lapse. */
  fallSilent(): void {
    clearInterval(this.heartbeat);
  }

  /** Leaves the run (once; later calls do nothing). */
  async leave(): Promise<void> {
    const bus = this.bus;
    this.bus = undefined;
    clearInterval(this.heartbeat);
    this.sub?.unsubscribe();
    if (!bus) return;
    await this.push?.end();
    bus.publish(this.harness.subjects.leave, MemberAnnounce, this.announce);
    await bus.drain();
  }

  /** Pushes chunks while the credit covers a whole one; returns the rows sent. */
  async pushWithinCredit(maxChunks = Infinity): Promise<number> {
    let rows = 0;
    const answers: Array<Promise<PushResponse>> = [];
    for (let n = 0; n < maxChunks && this.credit >= this.chunkRows; n++) {
      answers.push(this.pushChunk());
      rows += this.chunkRows;
    }
    this.answers.push(...(await Promise.all(answers)));
    return rows;
  }

  /** Pushes `chunks` chunks in all, each as soon as credit allows (a producer's loop). */
  async produce(chunks: number): Promise<void> {
    let pushed = 0;
    while (pushed < chunks) {
      await this.until(() => this.credit >= this.chunkRows);
      const rows = await this.pushWithinCredit(chunks - pushed);
      pushed += rows / this.chunkRows;
    }
  }

  /** Sends one chunk regardless of credit; `rowsPerContext` under the announced bound makes a short one, as packed contexts are. */
  pushChunk(rowsPerContext = this.rowsPerContext): Promise<PushResponse> {
    const contexts = Array.from({ length: this.contextsPerChunk }, () => this.nextContext++);
    this.sent += this.contextsPerChunk * rowsPerContext;
    return this.push!.send(
      makeChunk({
        producerId: this.id,
        producerNumber: this.number,
        sequence: this.sequence++,
        contexts,
        rowsPerContext,
      }),
    );
  }

  /** Resolves with the first Demand (the latest, or a later one) that satisfies `predicate`. */
  async until(predicate: (d: Demand) => boolean): Promise<Demand> {
    for (;;) {
      if (this.demand && predicate(this.demand)) return this.demand;
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
  }

  private apply(d: Demand): void {
    this.demand = d;
    this.demands.push(d);
    for (const w of this.waiters.splice(0)) w();
  }
}

/** The buffer's status for the test hook point. */
export async function hookStatus(harness: Harness) {
  const status = await harness.client.status({});
  return { state: status.state, producers: status.producers, ...status.hookPoints.find((h) => h.hookPoint === HOOK)! };
}

/** Waits until `n` trainer streams are attached (a stream attaches when the server handles its call). */
export async function attached(harness: Harness, n: number): Promise<void> {
  while ((await hookStatus(harness)).trainers.length < n) await new Promise((r) => setImmediate(r));
}
