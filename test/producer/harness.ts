import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { Demand, MemberAnnounce, type Subjects, subjects } from "../../services/common/coordination.js";
import { FieldError } from "../../services/common/errors.js";
import type { HandlerContext } from "../../services/common/grpc/adapter.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { type Bus, connectBus } from "../../services/common/nats.js";
import { Signal } from "../../services/common/signal.js";
import { type NatsServer, startNatsServer } from "../../tools/cli/nats-server.js";
import {
  type ActivationChunk,
  BufferService,
  type PushRequest,
  type PushResponse,
  PushResponseSchema,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { makeTinyLlama, type TinyLlama } from "../../tools/model/tiny-llama.js";

/**
 * The producer's surroundings for integration tests, all real: a nats-server, a gRPC server that
 * speaks the buffer's Push contract (records chunks, answers them in order, de-duplicates by
 * producer/hook/sequence) and a NATS client that plays the buffer's Demand messages.
 */

export const RUN_ID = "ptest";
export const D_MODEL = 64;

/** The tiny model in the project cache (generated once, reused by later runs). */
export function tinyModel(): TinyLlama {
  return makeTinyLlama({ out: ".cache/tiny-llama" });
}

export interface Received {
  chunk: ActivationChunk;
  /** Index of the stream (connection) the chunk came on. */
  stream: number;
}

/** An answer waiting its turn on a push stream; a held one goes out once release() was called `release` times. */
interface Answer {
  response: PushResponse;
  release: number;
}

/**
 * A test-side BufferService: records pushes and answers them in order. While `holding`, answers are
 * held back instead (a buffer that is slow to answer) until release(); chunks are still read and
 * recorded meanwhile, as gRPC flow control lets a producer write ahead.
 */
export class RecordingBuffer {
  readonly received: Received[] = [];
  readonly duplicates: ActivationChunk[] = [];
  holding = false;
  /** When set, a chunk of another run ends the stream with FAILED_PRECONDITION, as the buffer does. */
  runId: string | undefined;
  /** Called for each new chunk after it is recorded, before it is answered. */
  onChunk: (chunk: ActivationChunk) => void = () => undefined;
  private releases = 0;
  private crashed = false;
  private streams = 0;
  private readonly seen = new Set<string>();
  /** Wakes the test's until() and the push streams: a chunk came, answers were released, the buffer crashed. */
  private readonly changed = new Signal();

  private server!: RunningServer;

  static async start(address = "127.0.0.1:0", transport = loadConfig({}).transport): Promise<RecordingBuffer> {
    const self = new RecordingBuffer();
    const refuse = (): never => {
      throw new FieldError("method", "not served by the test buffer", status.UNIMPLEMENTED);
    };
    self.server = await startServer(address, transport, [
      bind(BufferService, {
        push: (requests, ctx) => self.push(requests, ctx),
        batches: async function* () {
          yield refuse();
        },
        status: async () => refuse(),
        pause: async () => refuse(),
        resume: async () => refuse(),
        drain: async () => refuse(),
      }),
    ]);
    return self;
  }

  get address(): string {
    return this.server.address;
  }

  get port(): number {
    return this.server.port;
  }

  chunks(hook?: string): ActivationChunk[] {
    return this.received.map((r) => r.chunk).filter((c) => hook === undefined || c.hookPoint === hook);
  }

  /** Resolves once `ready()` holds, re-checked on every chunk; rejects after `timeoutMs` (a hang, not a slow machine). */
  async until(ready: () => boolean, what: string, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!ready()) {
      if (Date.now() > deadline) throw new Error(`test buffer: timed out waiting for ${what}`);
      await this.changed.wait(undefined, 200);
    }
  }

  /** Sends the held answers and answers at once from now on. */
  release(): void {
    this.holding = false;
    this.releases++;
    this.changed.notify();
  }

  /** Kills the server as a crash would: streams are cut without their held answers. */
  async crash(): Promise<void> {
    this.crashed = true;
    this.changed.notify();
    await this.server.close(0);
  }

  close(): Promise<void> {
    return this.server.close(0);
  }

  /** One push stream: a reader records chunks as they come while answers go out in order, each once released. */
  private async *push(requests: AsyncIterable<PushRequest>, ctx: HandlerContext): AsyncIterable<PushResponse> {
    const stream = this.streams++;
    const answers: Answer[] = [];
    let ended = false;
    let failure: unknown;
    void (async () => {
      try {
        for await (const req of requests) answers.push(this.take(req.chunk!, stream));
      } catch (err) {
        failure = err;
      } finally {
        ended = true;
        this.changed.notify();
      }
    })();
    for (;;) {
      const due = () => answers.length > 0 && answers[0]!.release <= this.releases;
      await this.changed.until(() => this.crashed || due() || (ended && answers.length === 0) || failure !== undefined, ctx.signal);
      if (ctx.signal.aborted) return;
      if (this.crashed) throw new Error("the test buffer crashed");
      if (due()) yield answers.shift()!.response;
      else if (failure !== undefined) throw failure;
      else if (ended) return;
    }
  }

  /** Records a chunk (once per producer/hook/sequence) and makes its answer, held while `holding`. */
  private take(chunk: ActivationChunk, stream: number): Answer {
    if (this.runId !== undefined && chunk.runId !== this.runId) {
      throw new FieldError("chunk.run_id", `"${chunk.runId}" is not this buffer's run "${this.runId}"`, status.FAILED_PRECONDITION);
    }
    const key = `${chunk.producerId}/${chunk.hookPoint}/${chunk.sequence}`;
    const rows = chunk.activations?.shape[0] ?? 0;
    const answer = (accepted: number, dropped: number, release: number): Answer => ({
      response: create(PushResponseSchema, {
        hookPoint: chunk.hookPoint,
        sequence: chunk.sequence,
        rowsAccepted: accepted,
        rowsDropped: dropped,
        freeRows: 1_000_000n,
      }),
      release,
    });
    if (this.seen.has(key)) {
      this.duplicates.push(chunk);
      return answer(0, rows, this.releases);
    }
    this.seen.add(key);
    this.received.push({ chunk, stream });
    this.onChunk(chunk);
    const held = this.holding;
    this.changed.notify();
    return answer(rows, 0, held ? this.releases + 1 : this.releases);
  }
}

/** Plays the buffer's side of NATS: publishes Demand and answers hello with the latest one. */
export class DemandPlayer {
  private latest: Demand = { cycle: 0, command: "pause", grants: {}, freeRows: {}, done: [], endedShards: [] };

  private constructor(
    readonly bus: Bus,
    readonly subjects: Subjects,
  ) {}

  static async start(url: string): Promise<DemandPlayer> {
    const bus = await connectBus({ url, name: "test-buffer", log: () => undefined });
    const player = new DemandPlayer(bus, subjects("saeflow", RUN_ID));
    bus.reply(player.subjects.hello, MemberAnnounce, Demand, () => player.latest);
    await bus.flush();
    return player;
  }

  /** Grants rows (absolute, per producer) and says refill. */
  async grant(grants: Record<string, number>, cycle = 1): Promise<void> {
    await this.send({ cycle, command: "refill", grants, freeRows: {}, done: [], endedShards: [] });
  }

  async pause(): Promise<void> {
    await this.send({ ...this.latest, command: "pause" });
  }

  async send(demand: Demand): Promise<void> {
    this.latest = demand;
    this.bus.publish(this.subjects.demand, Demand, demand);
    await this.bus.flush();
  }

  drain(): Promise<void> {
    return this.bus.drain();
  }
}

/** Everything a producer test needs; `close` tears it down. */
export interface World {
  nats: NatsServer;
  /** The current test buffer; newBuffer() replaces it (closing the old one). */
  buffer: RecordingBuffer;
  newBuffer(address?: string): Promise<RecordingBuffer>;
  demand: DemandPlayer;
  dir: string;
  model: TinyLlama;
  /** A run config pointing at this world, with `producer` and `buffer` section overrides. */
  config(producer?: Record<string, unknown>, buffer?: Record<string, unknown>): RunConfig;
  close(): Promise<void>;
}

export async function startWorld(): Promise<World> {
  const model = tinyModel();
  const nats = await startNatsServer();
  const buffer = await RecordingBuffer.start();
  const demand = await DemandPlayer.start(nats.url);
  const dir = mkdtempSync(join(tmpdir(), "saeflow-producer-"));
  const world: World = {
    nats,
    buffer,
    newBuffer: async (address) => {
      await world.buffer.close();
      world.buffer = await RecordingBuffer.start(address);
      return world.buffer;
    },
    demand,
    dir,
    model,
    config: (producer = {}, buffer = {}) =>
      loadConfig({
        base: {
          run: { id: RUN_ID, dir: join(dir, "run") },
          nats: { url: nats.url },
          buffer: {
            hookPoints: [
              { name: "blocks.0.hook_resid_post", dModel: D_MODEL },
              { name: "blocks.1.hook_resid_post", dModel: D_MODEL },
              { name: "blocks.1.hook_mlp_out", dModel: D_MODEL },
            ],
            address: world.buffer.address,
            ...buffer,
          },
          producer: { model: model.modelPath, address: "127.0.0.1:0", ...producer },
        },
      }),
    close: async () => {
      await demand.drain();
      await world.buffer.close();
      await nats.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return world;
}

/** Writes `files` (relative path → content) under a fresh folder in `root` and returns it. */
export function writeDataset(root: string, name: string, files: Record<string, string>): string {
  const dir = join(root, name);
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(join(dir, path, ".."), { recursive: true });
    writeFileSync(join(dir, path), content);
  }
  return dir;
}

/** A few paragraphs of distinct English sentences, `n` documents when split by paragraph. */
export function paragraphs(n: number, seed = 0): string {
  const words = ["river", "stone", "light", "garden", "window", "paper", "morning", "signal", "harbor", "engine", "forest", "letter"];
  const out: string[] = [];
  for (let i = 0; i < n; i++) {
    const w = (k: number) => words[(i * 7 + k * 5 + seed) % words.length]!;
    out.push(
      `Document ${seed}-${i} speaks of the ${w(0)} and the ${w(1)}. It was written on a ${w(2)} day, near the ${w(3)}, and it ends here.`,
    );
  }
  return out.join("\n\n") + "\n";
}
