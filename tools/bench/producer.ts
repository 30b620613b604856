import { type ChildProcess, fork } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { create } from "@bufbuild/protobuf";
import ort from "onnxruntime-node";
import { loadConfig } from "../../services/common/config/index.js";
import { startNatsServer } from "../cli/nats-server.js";
import { connectBus } from "../../services/common/nats.js";
import { Demand, subjects } from "../../services/common/coordination.js";
import { bind, startServer } from "../../services/common/grpc/server.js";
import { BufferService, PushResponseSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { type Batch, makeBatch } from "../../services/producer/batch.js";
import { encodeAhead } from "../../services/producer/dataset/ahead.js";
import { shardContexts } from "../../services/producer/dataset/contexts.js";
import { freshPosition } from "../../services/producer/dataset/position.js";
import { readDocuments, readOptionsOf, resolveSources } from "../../services/producer/dataset/sources.js";
import { loadModel } from "../../services/producer/model/onnx.js";
import { sessionFor } from "../../services/producer/model/session.js";
import { truncateAtHooks } from "../../services/producer/model/truncate.js";
import { type RunningProducer, startProducer } from "../../services/producer/producer.js";
import { loadTokenizer, type TextTokenizer } from "../../services/producer/tokenizer.js";
import { pretokenize, TOKENS_FIELD } from "../cli/pretokenize.js";
import { makeTinyLlama } from "../model/tiny-llama.js";
import { line, median, packageVersion, round } from "./stats.js";

/**
 * The producer on the tiny Llama (builtin corpus, Llama-3.1 tokenizer, CPU) at context 128 and
 * 1024: tokens/s and activation bytes/s through the whole service (dataset, tokenizer, forward,
 * conversion, push over gRPC to a buffer stand-in in another process, NATS grants), beside a bare
 * onnxruntime session running the same batches of the same cut model in the same run, and the CPU
 * a token each takes, with the share of the producer's that reading and tokenizing the text take.
 * The same again with the corpus pretokenized (saeflow pretokenize), the producer reading ids, so
 * that what tokenizing costs the producer shows beside what the rest of it costs. Then what cutting
 * the model after an early hook point saves against running it whole (to the logits).
 */
const HOOK = "blocks.1.hook_resid_post";
const EARLY_HOOK = "blocks.0.hook_resid_post";
const TOKENS_PER_PASS = 2048;
const WARMUP_PASSES = 3;
const ROUNDS = 5;
const PASSES = 36;
const PEER_FLAG = "--producer-bench-peer";
/** How the bench reads the builtin corpus, for the batches it times and for the tokenizing it measures alone: as the producer does. */
const CORPUS_READ = { textSplit: "paragraph", textField: "text", log: () => undefined } as const;

/** What a measured producer reads: the builtin corpus as text, or its copy made by saeflow pretokenize. */
interface Corpus {
  /** Prefix of this corpus' lines and JSON keys. */
  label: string;
  dataset: string[];
  tokensField: string;
}
const TEXT: Corpus = { label: "", dataset: ["builtin:corpus"], tokensField: "" };
/** The JSON key part of what reading a corpus costs: tokenizing text, or reading ids. */
const readKey = (corpus: Corpus): string => (corpus.tokensField ? "read_ids" : "tokenize");

/** What the bench and its buffer stand-in say to each other over the fork's channel. */
type ToPeer = { type: "expect"; runId: string; hookPoint: string; rows: number } | { type: "stop" };
type FromPeer = { type: "listening"; address: string } | { type: "reached"; runId: string };

/**
 * The buffer stand-in: answers every chunk at once, as a buffer with room does, and tells the bench
 * when a run's rows of one hook point reach the count it expects, so the bench's clock stops when
 * the last chunk arrives without the bench polling the producer it measures meanwhile.
 */
async function servePeer(): Promise<void> {
  const transport = loadConfig({}).transport;
  const refuse = (): never => {
    throw new Error("not part of the producer benchmark");
  };
  // Rows received, and the count the bench waits for, by run id and hook point.
  const received = new Map<string, number>();
  const expected = new Map<string, { runId: string; rows: number }>();
  const say = (m: FromPeer) => process.send!(m);
  const check = (key: string) => {
    const want = expected.get(key);
    if (want === undefined || (received.get(key) ?? 0) < want.rows) return;
    expected.delete(key);
    say({ type: "reached", runId: want.runId });
  };
  const server = await startServer("127.0.0.1:0", transport, [
    bind(BufferService, {
      push: async function* (requests) {
        for await (const req of requests) {
          const c = req.chunk!;
          const rows = c.activations!.shape[0]!;
          const key = `${c.runId}/${c.hookPoint}`;
          received.set(key, (received.get(key) ?? 0) + rows);
          check(key);
          yield create(PushResponseSchema, { hookPoint: c.hookPoint, sequence: c.sequence, rowsAccepted: rows });
        }
      },
      batches: async function* () {
        yield refuse();
      },
      status: async () => refuse(),
      pause: async () => refuse(),
      resume: async () => refuse(),
      drain: async () => refuse(),
    }),
  ]);
  process.on("message", async (m: ToPeer) => {
    if (m.type === "expect") {
      const key = `${m.runId}/${m.hookPoint}`;
      expected.set(key, { runId: m.runId, rows: m.rows });
      check(key);
      return;
    }
    await server.close(100);
    process.disconnect();
  });
  say({ type: "listening", address: server.address });
}

/** The first `count` batches the producer would run, built by its own dataset code. */
async function sameBatches(tokenizer: TextTokenizer, contextLength: number, batchContexts: number, count: number): Promise<Batch[]> {
  const contexts = shardContexts(
    {
      files: resolveSources(["builtin:corpus"]),
      read: CORPUS_READ,
      shard: { index: 0, count: 1 },
      pack: { contextLength, prependBos: true, excludeBos: true, bosId: tokenizer.bosId, padId: tokenizer.padId },
      encode: tokenizer.encode,
      epochs: 0,
    },
    freshPosition(),
  );
  const batches: Batch[] = [];
  while (batches.length < count) {
    const picked = [];
    for (let i = 0; i < batchContexts; i++) picked.push((await contexts.next()).value!);
    batches.push(makeBatch(picked, contextLength));
  }
  await contexts.return(undefined);
  return batches;
}

const feedsOf = (b: Batch): Record<string, ort.Tensor> => {
  const dims = [b.inputs.batch, b.inputs.length];
  return {
    input_ids: new ort.Tensor("int64", b.inputs.inputIds, dims),
    attention_mask: new ort.Tensor("int64", b.inputs.attentionMask, dims),
    position_ids: new ort.Tensor("int64", b.inputs.positionIds, dims),
  };
};

/** Seconds a bare session takes for `batches`, fetching only `outputs`. */
async function bareSeconds(session: ort.InferenceSession, batches: Batch[], outputs: string[]): Promise<number> {
  const t0 = performance.now();
  for (const b of batches) await session.run(feedsOf(b), outputs);
  return (performance.now() - t0) / 1000;
}

const cpuSeconds = (used: NodeJS.CpuUsage): number => (used.user + used.system) / 1e6;

/** How long a round may take before the bench gives up on it: rounds here take seconds. */
const ROUND_TIMEOUT_MS = 120_000;

/** Polls `ready` every 2 ms; throws naming `what` after ROUND_TIMEOUT_MS. */
async function until(ready: () => boolean, what: string): Promise<void> {
  const deadline = performance.now() + ROUND_TIMEOUT_MS;
  while (!ready()) {
    if (performance.now() > deadline) throw new Error(`${what}: not after ${ROUND_TIMEOUT_MS / 1000} s`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** The bench's end of the fork channel to its buffer stand-in. */
class Peer {
  private readonly waiting = new Map<string, { resolve: () => void; reject: (err: Error) => void }>();

  constructor(private readonly child: ChildProcess) {
    child.on("message", (m: FromPeer) => {
      if (m.type !== "reached") return;
      this.waiting.get(m.runId)?.resolve();
    });
    // A stand-in that died would otherwise leave the bench waiting for its word forever.
    child.on("exit", (code, signal) => {
      for (const w of [...this.waiting.values()])
        w.reject(new Error(`the buffer stand-in exited (${signal ?? `code ${code}`}) during a round`));
    });
  }

  /**
   * Resolves once the stand-in has received `rows` rows of `hookPoint` in `runId`, counted from the
   * start; rejects after ROUND_TIMEOUT_MS (a producer that stopped pushing) or if the stand-in exits.
   */
  received(runId: string, hookPoint: string, rows: number): Promise<void> {
    this.send({ type: "expect", runId, hookPoint, rows });
    const reached = new Promise<void>((resolve, reject) => {
      const done = (settle: () => void) => {
        clearTimeout(timer);
        this.waiting.delete(runId);
        settle();
      };
      const timer = setTimeout(
        () =>
          done(() =>
            reject(new Error(`the buffer stand-in had not received ${rows} rows of ${hookPoint} after ${ROUND_TIMEOUT_MS / 1000} s`)),
          ),
        ROUND_TIMEOUT_MS,
      );
      this.waiting.set(runId, { resolve: () => done(resolve), reject: (err) => done(() => reject(err)) });
    });
    return reached;
  }

  send(m: ToPeer): void {
    // child.send on a closed channel emits an 'error' event that would end the bench with Node's stack.
    if (!this.child.connected) throw new Error("the buffer stand-in is gone (its process exited)");
    this.child.send(m);
  }

  /** Stops the stand-in, unless it is gone already (the error that ended the bench is what to see). */
  async stop(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = new Promise((r) => this.child.once("exit", r));
    if (this.child.connected) this.send({ type: "stop" });
    else this.child.kill();
    await exited;
  }
}

/** What a pass at `contextLength` brings at most (rows per hook point), and what one context brings (BOS left out). */
const passShape = (contextLength: number) => ({
  chunkRows: (TOKENS_PER_PASS / contextLength) * (contextLength - 1),
  contextRows: contextLength - 1,
});

/**
 * Grants `passes` more passes and times them (wall and this process' CPU) until the last of their
 * chunks reaches the buffer stand-in; then waits, untimed, for the producer to park. Grants count
 * rows per hook point, Status's rows_sent over every hook point. A pass brings at most `chunkRows`
 * rows (fewer where a document's BOS is left out), so the producer may run a pass more than
 * `passes` to use its grant; the figures count every pass it ran.
 */
async function timedGrant(
  setup: Setup,
  runId: string,
  producer: RunningProducer,
  pass: ReturnType<typeof passShape>,
  passes: number,
  cycle: number,
) {
  const before = producer.status();
  const hooks = before.hookPoints.length;
  const perHook = (s: typeof before) => Number(s.rowsSent) / hooks;
  const grant = perHook(before) + passes * pass.chunkRows;
  // The producer takes another context while one more fits in the grant, so it parks once past
  // this count, and only its last pass takes it there. A pass pushes its hook points in order, so
  // the last hook point's chunk is the pass' last.
  const last = grant - pass.contextRows + 1;
  const arrived = setup.peer.received(runId, before.hookPoints.at(-1)!, last);
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  setup.bus.publish(subjects("saeflow", runId).demand, Demand, {
    cycle,
    command: "refill",
    grants: { [producer.id]: grant },
    freeRows: {},
  });
  await arrived;
  const seconds = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds(process.cpuUsage(cpu0));
  await until(() => {
    const s = producer.status();
    return s.state === ServiceState.PAUSED && perHook(s) >= last;
  }, "the producer parks once its grant is used up");
  const after = producer.status();
  return { seconds, cpu, tokens: Number(after.tokens - before.tokens), bytes: Number(after.bytesSent - before.bytesSent) };
}

interface Setup {
  model: ReturnType<typeof makeTinyLlama>;
  tokenizer: ReturnType<typeof loadTokenizer>;
  full: ReturnType<typeof loadModel>;
  natsUrl: string;
  bus: Awaited<ReturnType<typeof connectBus>>;
  address: string;
  peer: Peer;
  runDir: string;
}

/**
 * The producer against a bare session on the same batches, at one context length: tokens/s, and the
 * CPU a token in this process, beside the bare session's, with the share of the producer's that
 * reading and tokenizing take (`tokenizeCpu`: CPU-seconds a token, from measureReadTokenize). The
 * producer's tokenize-ahead refills as the producer consumes, so what it still encodes when a round
 * ends falls in the bare session's round and counts to the bare session's CPU.
 */
async function measureContext(setup: Setup, contextLength: number, tokenizeCpu: number, corpus: Corpus): Promise<Record<string, number>> {
  const { model, full } = setup;
  const batchContexts = TOKENS_PER_PASS / contextLength;
  const runId = `bench-${contextLength}${corpus.label}`;
  const config = loadConfig({
    base: {
      run: { id: runId, dir: setup.runDir },
      nats: { url: setup.natsUrl },
      buffer: { address: setup.address, hookPoints: [{ name: HOOK, dModel: model.params.dModel }] },
      producer: {
        model: model.modelPath,
        hookPoints: [HOOK],
        contextLength,
        batchContexts,
        resume: false,
        dataset: corpus.dataset,
        tokensField: corpus.tokensField,
      },
    },
  });
  const producer = await startProducer(config, { address: "127.0.0.1:0", log: () => undefined });
  const session = await sessionFor(truncateAtHooks(full, [HOOK]), dirname(model.modelPath));
  const pass = passShape(contextLength);
  await timedGrant(setup, runId, producer, pass, WARMUP_PASSES, 0);
  // Rounds alternate between the producer and the bare session, so that load from elsewhere on
  // the machine hits both alike; each figure is the median over rounds.
  const batches = await sameBatches(setup.tokenizer, contextLength, batchContexts, WARMUP_PASSES + ROUNDS * PASSES);
  const producerTps: number[] = [];
  const producerBps: number[] = [];
  const bareTps: number[] = [];
  // CPU-seconds a token in this process (the buffer stand-in's excluded).
  const producerCpu: number[] = [];
  const bareCpu: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const p = await timedGrant(setup, runId, producer, pass, PASSES, r + 1);
    producerCpu.push(p.cpu / p.tokens);
    producerTps.push(p.tokens / p.seconds);
    producerBps.push(p.bytes / p.seconds);
    const same = batches.slice(WARMUP_PASSES + r * PASSES, WARMUP_PASSES + (r + 1) * PASSES);
    const sameTokens = same.reduce((n, b) => n + b.tokens, 0);
    const cpu0 = process.cpuUsage();
    bareTps.push(sameTokens / (await bareSeconds(session, same, [HOOK])));
    bareCpu.push(cpuSeconds(process.cpuUsage(cpu0)) / sameTokens);
  }
  await producer.stop();
  await session.release();

  const key = `ctx${contextLength}${corpus.label && `_${corpus.label}`}`;
  const ratio = median(producerTps.map((t, i) => t / bareTps[i]!));
  line(
    `producer, context ${contextLength} x ${batchContexts}${corpus.label && `, ${corpus.label}`}`,
    median(producerTps) / 1000,
    "k tokens/s",
    {
      label: "bare ORT",
      value: median(bareTps) / 1000,
    },
  );
  line(`  producer/bare ORT tok/s (median of rounds)`, ratio, "");
  line(`  activation bytes/s (fp32, d_model ${model.params.dModel})`, median(producerBps) / 1e6, "MB/s");
  line(`  CPU a token in this process (buffer stand-in apart)`, median(producerCpu) * 1e6, "µs", {
    label: "bare ORT",
    value: median(bareCpu) * 1e6,
  });
  line(
    `  ${corpus.tokensField ? "reading ids" : "reading + tokenizing"}, of the producer's CPU a token`,
    tokenizeCpu / median(producerCpu),
    "",
  );
  return {
    [`${key}_tokens_per_s`]: round(median(producerTps), 0),
    [`${key}_activation_mb_per_s`]: round(median(producerBps) / 1e6, 2),
    [`${key}_bare_ort_tokens_per_s`]: round(median(bareTps), 0),
    [`${key}_vs_bare_ort_ratio`]: round(ratio, 3),
    [`${key}_cpu_us_per_token`]: round(median(producerCpu) * 1e6, 3),
    [`${key}_bare_ort_cpu_us_per_token`]: round(median(bareCpu) * 1e6, 3),
    [`${key}_cpu_per_token_vs_bare_ort_ratio`]: round(median(producerCpu) / median(bareCpu), 3),
    [`${key}_${readKey(corpus)}_of_cpu_ratio`]: round(tokenizeCpu / median(producerCpu), 3),
  };
}

/** Cutting after an early hook point against running the whole model, on the same batches. */
async function measureTruncation(setup: Setup): Promise<Record<string, number>> {
  const { full, model } = setup;
  const batches = await sameBatches(setup.tokenizer, 128, 4, 6);
  // Whole-model runs allocate 250 MB of logits each, and the garbage collector makes whatever runs
  // next pay for them, so each session runs all its rounds in a block, the whole model last.
  const ms = { early: [] as number[], last: [] as number[], whole: [] as number[] };
  for (const [name, cut, outputs] of [
    ["early", truncateAtHooks(full, [EARLY_HOOK]), [EARLY_HOOK]],
    ["last", truncateAtHooks(full, [HOOK]), [HOOK]],
    ["whole", full, ["logits"]],
  ] as const) {
    const session = await sessionFor(cut, dirname(model.modelPath));
    await bareSeconds(session, batches.slice(0, 1), [...outputs]);
    for (let r = 0; r < ROUNDS; r++) ms[name].push(((await bareSeconds(session, batches, [...outputs])) / batches.length) * 1000);
    await session.release();
  }
  const whole = median(ms.whole);
  const figures: Record<string, number> = { whole_model_ms_per_pass: round(whole, 2) };
  for (const [name, hook] of [
    ["early", EARLY_HOOK],
    ["last", HOOK],
  ] as const) {
    line(`forward 4 x 128 cut after ${hook}`, median(ms[name]), "ms/pass", { label: "whole model", value: whole });
    figures[`truncate_${name}_ms_per_pass`] = round(median(ms[name]), 2);
    figures[`truncate_${name}_speedup_ratio`] = round(whole / median(ms[name]), 2);
  }
  return figures;
}

/**
 * The producer's reading and tokenizing of the whole builtin corpus, done as the producer does it
 * (its document reader and tokenize-ahead, Hugging Face's tokenizer), or its reading of the ids of
 * the pretokenized copy: CPU-seconds a token over every thread of this process, since on the
 * producer's cores this takes CPU from the forward pass, and tokens per wall second. Median of three
 * runs after one to warm up.
 */
async function measureReadTokenize(setup: Setup, corpus: Corpus): Promise<{ cpuPerToken: number; figures: Record<string, number> }> {
  const files = resolveSources(corpus.dataset);
  const read = readOptionsOf({ ...CORPUS_READ, tokensField: corpus.tokensField }, setup.tokenizer.vocabSize, CORPUS_READ.log);
  const readAll = async () => {
    const documents = readDocuments(files, read, freshPosition().cursor);
    let tokens = 0;
    for await (const { ids } of encodeAhead(documents, setup.tokenizer.encode)) tokens += ids.length;
    return tokens;
  };
  const tokens = await readAll();
  const cpu: number[] = [];
  const wall: number[] = [];
  for (let r = 0; r < 3; r++) {
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    await readAll();
    wall.push((performance.now() - t0) / 1000);
    cpu.push(cpuSeconds(process.cpuUsage(cpu0)));
  }
  const cpuPerToken = median(cpu) / tokens;
  const what = corpus.tokensField ? "read the ids of the builtin corpus, pretokenized" : "read + tokenize the builtin corpus";
  const key = readKey(corpus);
  line(`${what} (${tokens} tokens)`, tokens / median(wall) / 1e6, "M tok/s");
  line(`  CPU a token`, cpuPerToken * 1e6, "µs");
  return {
    cpuPerToken,
    figures: { [`${key}_tokens_per_s`]: round(tokens / median(wall), 0), [`${key}_cpu_us_per_token`]: round(cpuPerToken * 1e6, 3) },
  };
}

/** Hook points of an 8-block model: four per block, the last block's resid_post in every set, so every set runs the same forward pass. */
const DEEP_LAYERS = 8;
const DEEP_HOOKS = [
  `blocks.${DEEP_LAYERS - 1}.hook_resid_post`,
  ...Array.from({ length: DEEP_LAYERS }, (_, l) =>
    ["hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"].map((k) => `blocks.${l}.${k}`),
  )
    .flat()
    .filter((h) => h !== `blocks.${DEEP_LAYERS - 1}.hook_resid_post`),
];

/**
 * One forward pass feeding 1, 8 and 32 hook points of an 8-block model at context 128: what each
 * extra hook point costs (its conversion and push), as a fraction of a one-hook pass.
 */
async function measureHookPoints(setup: Setup): Promise<Record<string, number>> {
  const deep = makeTinyLlama({ out: ".cache/tiny-llama-8l", layers: DEEP_LAYERS });
  const contextLength = 128;
  const batchContexts = TOKENS_PER_PASS / contextLength;
  const pass = passShape(contextLength);
  const rates: number[] = [];
  const figures: Record<string, number> = {};
  for (const count of [1, 8, 32]) {
    const hooks = DEEP_HOOKS.slice(0, count);
    const runId = `bench-hooks-${count}`;
    const config = loadConfig({
      base: {
        run: { id: runId, dir: setup.runDir },
        nats: { url: setup.natsUrl },
        buffer: { address: setup.address, hookPoints: hooks.map((name) => ({ name, dModel: deep.params.dModel })) },
        producer: { model: deep.modelPath, hookPoints: hooks, contextLength, batchContexts, resume: false },
        trainer: { hookPoints: [hooks[0]] },
      },
    });
    const producer = await startProducer(config, { address: "127.0.0.1:0", log: () => undefined });
    await timedGrant(setup, runId, producer, pass, WARMUP_PASSES, 0);
    const tps: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      const p = await timedGrant(setup, runId, producer, pass, PASSES, r + 1);
      tps.push(p.tokens / p.seconds);
    }
    await producer.stop();
    const rate = median(tps);
    rates.push(rate);
    line(`producer, ${count} hook point(s), 8 blocks, context 128 x 16`, rate / 1000, "k tokens/s");
    figures[`hooks${count}_tokens_per_s`] = round(rate, 0);
  }
  // Seconds per token grow by a hook point's conversion and push; as a share of a one-hook pass.
  for (const [i, count] of [
    [1, 8],
    [2, 32],
  ] as const) {
    const extra = (1 / rates[i]! - 1 / rates[0]!) / (count - 1) / (1 / rates[0]!);
    line(`  cost of each extra hook point (of ${count}), share of a one-hook pass`, extra, "");
    figures[`hooks${count}_extra_hook_cost_ratio`] = round(extra, 4);
  }
  return figures;
}

export async function run(): Promise<Record<string, number | string>> {
  const model = makeTinyLlama({ out: ".cache/tiny-llama" });
  const nats = await startNatsServer();
  const child = fork(fileURLToPath(import.meta.url), [PEER_FLAG], {
    execArgv: ["--import", "tsx"],
    cwd: dirname(fileURLToPath(new URL("../../package.json", import.meta.url))),
  });
  const { address } = await new Promise<{ address: string }>((resolve) =>
    child.once("message", (m: FromPeer) => m.type === "listening" && resolve(m)),
  );
  const setup: Setup = {
    model,
    tokenizer: loadTokenizer("builtin:llama3_1"),
    full: loadModel(model.modelPath),
    natsUrl: nats.url,
    bus: await connectBus({ url: nats.url, name: "bench-buffer", log: () => undefined }),
    address,
    peer: new Peer(child),
    runDir: mkdtempSync(join(tmpdir(), "saeflow-bench-producer-")),
  };
  try {
    const tokenize = await measureReadTokenize(setup, TEXT);
    // The same corpus tokenized once ahead, as `saeflow pretokenize` writes it for a producer to read ids from.
    const pretokenized: Corpus = { label: "pretokenized", dataset: [join(setup.runDir, "corpus.jsonl")], tokensField: TOKENS_FIELD };
    await pretokenize(
      { ...CORPUS_READ, dataset: TEXT.dataset, tokenizer: "builtin:llama3_1", tokensField: "" },
      pretokenized.dataset[0]!,
      () => undefined,
    );
    const readIds = await measureReadTokenize(setup, pretokenized);
    return {
      reference:
        "a bare onnxruntime-node session on the same cut model and the same batches, CPU provider, intra-op threads onnxruntime's default (its count of physical cores), as the producer's own session here",
      onnxruntime: ort.env.versions.common,
      tokenizers: packageVersion("tokenizers"),
      ...tokenize.figures,
      ...readIds.figures,
      ...(await measureContext(setup, 128, tokenize.cpuPerToken, TEXT)),
      ...(await measureContext(setup, 1024, tokenize.cpuPerToken, TEXT)),
      ...(await measureContext(setup, 128, readIds.cpuPerToken, pretokenized)),
      ...(await measureContext(setup, 1024, readIds.cpuPerToken, pretokenized)),
      ...(await measureHookPoints(setup)),
      ...(await measureTruncation(setup)),
    };
  } finally {
    await setup.bus.drain();
    await setup.peer.stop();
    await nats.stop();
    rmSync(setup.runDir, { recursive: true, force: true });
  }
}

if (process.argv.includes(PEER_FLAG)) await servePeer();
