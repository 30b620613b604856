import { type Link, trace } from "@opentelemetry/api";
import { basename, dirname, join } from "node:path";
import ort from "onnxruntime-node";
import { ConfigError, type RunConfig, type TrainerConfig } from "../common/config/index.js";
import type { SaeSpec } from "../common/config/sections/trainer.js";
import { decodeFloats, dtypeFromName } from "../common/tensor-codec.js";
import { linkFrom } from "../common/telemetry.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { Batch, BatchSource } from "./batches.js";
import { type Checkpoint, checkpointPath, checkpointSteps, firingOf, loadCheckpoint, saveCheckpoint } from "./checkpoint.js";
import { exportSaeLens, type ExportInfo } from "./export.js";
import { FiringWindows } from "./firing.js";
import { rankedRecipe, STAT, type StepRecipe, type StepSpec } from "./graph/step.js";
import { jumpReluThresholds } from "./jumprelu.js";
import { MetricsFile, TrainerMeters, Window, type WindowMetrics } from "./metrics.js";
import type { StepScalars } from "./reference.js";
import { Rng } from "./rng.js";
import { decoderNorms, initialBDec, initState, normalisationScale, type SaeState } from "./sae.js";
import { activeK, learningRate, rampedCoefficient } from "./schedule.js";
import { StepSession } from "./session.js";

const tracer = trace.getTracer("saeflow.trainer");

export interface TrainerOptions {
  config: RunConfig;
  source: BatchSource;
  /** Progress lines (one per SAE every logEvery steps); none when absent. */
  log?: (line: string) => void;
}

/** What a finished run left behind. */
export interface RunResult {
  step: number;
  checkpoints: string[];
  exports: string[];
}

/** Per-SAE status, as the Status RPC reports it. */
export interface SaeReport {
  name: string;
  recipe: string;
  step: number;
  tokens: number;
  latest: WindowMetrics | undefined;
  deadFraction: number;
  learningRate: number;
}

/** Runs functions one at a time, in call order: steps, checkpoints and exports never overlap. */
class Lock {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

/** The step-graph recipe an SAE trains with: JumpReLU trains as TopK and is converted at export. */
const stepRecipe = (spec: SaeSpec): StepRecipe => (spec.recipe === "jumprelu" ? "topk" : spec.recipe);

/** The SAELens architecture each recipe exports as; the BatchTopK family and JumpReLU as thresholds. */
const EXPORTED_AS: Record<SaeSpec["recipe"], ExportInfo["architecture"]> = {
  topk: "topk",
  jumprelu: "jumprelu",
  batchtopk: "jumprelu",
  matryoshka: "jumprelu",
  relu: "standard",
  gated: "gated",
};

/** One SAE of the sweep: its state, dead-latent record, metrics and files. */
class SaeRun {
  /** The step graph in use: a dense one fed k while k anneals, then one built for k. */
  session: StepSession | undefined;
  state: SaeState | undefined;
  rng: Rng;
  lastFired: Float64Array;
  firing: FiringWindows;
  thresholdEma = 0;
  readonly window = new Window();
  latest: WindowMetrics | undefined;
  readonly metrics: MetricsFile;
  readonly recipe: StepRecipe;

  constructor(
    readonly spec: SaeSpec,
    readonly index: number,
    readonly dir: string,
    seed: number,
    cfg: TrainerConfig,
  ) {
    this.rng = new Rng(seed, spec.name);
    this.recipe = stepRecipe(spec);
    this.lastFired = new Float64Array(spec.width);
    this.firing = new FiringWindows(spec.width, Math.ceil(cfg.sparsityWindowTokens / cfg.batchSize), cfg.steps);
    this.metrics = new MetricsFile(join(dir, "metrics.jsonl"));
  }

  get checkpointDir(): string {
    return join(this.dir, "checkpoints");
  }

  get exportDir(): string {
    return join(this.dir, "sae_lens");
  }

  /** Latents that have not fired within the dead window. */
  dead(tokens: number, window: number): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.lastFired.length; i++) if (tokens - this.lastFired[i]! >= window) out.push(i);
    return out;
  }

  current(): SaeState {
    const s = this.session?.state ?? this.state;
    if (!s) throw new Error(`SAE ${this.spec.name} is not initialised`);
    return s;
  }
}

/**
 * The trainer: one stream of batches, one or several SAEs trained on each batch, metrics every
 * logEvery steps, checkpoints that resume bit for bit, SAELens export at the end. Usable as a
 * library (tools, tests); services/trainer/main.ts wires it to gRPC.
 */
export class Trainer {
  private readonly cfg: TrainerConfig;
  private readonly saes: SaeRun[];
  private readonly lock = new Lock();
  private readonly meters = new TrainerMeters();
  private readonly log: (line: string) => void;
  private serviceState = ServiceState.STARTING;
  private stepsDone = 0;
  private tokens = 0;
  private scale = 1;
  private input: "fp32" | "fp16" | undefined;
  private bf16Rows: Float32Array | undefined;
  private lastCheckpointStep = -1;
  private readonly calibration: ort.Tensor[] = [];
  private paused = false;
  private torn = false;
  private stopping = false;
  private exportAtEnd: boolean;
  private wakers: Array<() => void> = [];
  private waitMs = 0;
  private windowWaitMs = 0;
  private windowRows = 0;
  private startedAt = 0;
  private windowStartedAt = 0;
  private markReady!: () => void;
  private running: Promise<RunResult> | undefined;
  /** Settles once every SAE has a state and a session, i.e. training can proceed. */
  readonly ready = new Promise<void>((resolve) => (this.markReady = resolve));

  constructor(private readonly options: TrainerOptions) {
    this.cfg = options.config.trainer;
    this.log = options.log ?? (() => undefined);
    this.exportAtEnd = this.cfg.exportOnFinish;
    this.saes = this.cfg.saes.map(
      (spec, i) => new SaeRun(spec, i, join(options.config.run.dir, spec.name), options.config.run.seed, this.cfg),
    );
  }

  get state(): ServiceState {
    return this.serviceState;
  }

  get runDir(): string {
    return this.options.config.run.dir;
  }

  get initialised(): boolean {
    return this.saes.every((s) => s.session);
  }

  /** Trains until `steps`, the end of the stream, or stop(); then checkpoints and exports. */
  run(): Promise<RunResult> {
    this.running ??= this.train();
    return this.running;
  }

  /**
   * SAELens exports from the newest checkpoint every SAE of the sweep holds, without training: what
   * `saeflow export` runs on a run folder. JumpReLU's conversion draws its calibration batches from
   * the source, so it needs a live buffer; the other recipes need none.
   */
  async exportCheckpoints(): Promise<string[]> {
    if (!this.restore()) {
      throw ConfigError.at("run.dir", `${this.runDir} holds no checkpoint of ${this.saes.map((s) => s.spec.name).join(", ")}`);
    }
    return this.lock.run(() => this.exportAll());
  }

  private async train(): Promise<RunResult> {
    try {
      const pending = this.cfg.resume && this.restore() ? [] : await this.initialise();
      this.startedAt = this.windowStartedAt = performance.now();
      this.serviceState = this.paused ? ServiceState.PAUSED : ServiceState.RUNNING;
      while (this.stepsDone < this.cfg.steps && !this.stopping) {
        await this.unpaused();
        if (this.stopping) break;
        const asked = performance.now();
        const batch = pending.shift() ?? (await this.nextBatch());
        const waited = performance.now() - asked;
        if (!batch) break;
        await this.lock.run(() => this.trainStep(batch, waited));
      }
      return await this.finish();
    } catch (err) {
      this.serviceState = ServiceState.STOPPED;
      // A step that failed part-way may have moved some SAEs of the sweep and not others: keep the
      // last checkpoint then, rather than write a torn one.
      if (this.initialised && !this.torn && this.lastCheckpointStep !== this.stepsDone) {
        await this.lock.run(async () => this.checkpointAll()).catch(() => undefined);
      }
      throw err;
    } finally {
      this.options.source.close();
      for (const sae of this.saes) await sae.session?.release();
    }
  }

  /** Fresh start: normalisation and b_dec from the first batches, which are then trained on. */
  private async initialise(): Promise<Batch[]> {
    const first: Batch[] = [];
    while (first.length < Math.min(this.cfg.normEstimateBatches, this.cfg.steps)) {
      const batch = await this.nextBatch();
      if (!batch) break;
      first.push(batch);
    }
    if (first.length === 0) return first;
    const d = this.cfg.dModel;
    const rows = first.map((b) => decodeFloats(b.data, dtypeFromName(b.dtype)));
    this.scale = this.cfg.normalizeActivations === "expected_average" ? normalisationScale(rows, d) : 1;
    const bDec = initialBDec(rows, d, this.scale, this.cfg.bDecInit);
    for (const sae of this.saes)
      sae.state = initState(sae.spec.width, d, sae.rng, bDec, { decoderNorm: this.cfg.decoderInitNorm, recipe: sae.recipe });
    return first;
  }

  /** Loads the newest step every SAE holds a checkpoint for; false when there is none at all. */
  private restore(): boolean {
    const held = this.saes.map((s) => checkpointSteps(s.checkpointDir));
    if (held.every((steps) => steps.length === 0)) return false;
    const common = held[0]!.filter((step) => held.every((steps) => steps.includes(step)));
    const step = common.at(-1);
    if (step === undefined) {
      const missing = this.saes.filter((_, i) => held[i]!.length === 0).map((s) => s.spec.name);
      throw ConfigError.at("trainer.resume", `the SAEs of the sweep hold no checkpoint at a common step${missing.length ? ` (${missing.join(", ")} hold none)` : ""}; remove their checkpoints or set trainer.resume=false`);
    }
    for (const sae of this.saes) {
      const ckpt = loadCheckpoint(checkpointPath(sae.checkpointDir, step), sae.recipe, sae.spec.width, this.cfg.dModel);
      this.checkResumable(sae, ckpt);
      sae.state = ckpt.state;
      sae.lastFired = ckpt.lastFired;
      [sae.firing.current, sae.firing.previous] = firingOf(ckpt);
      sae.rng = Rng.fromState(ckpt.meta.rng);
      sae.thresholdEma = ckpt.meta.thresholdEma;
      this.scale = ckpt.meta.scale;
      this.tokens = ckpt.meta.tokens;
    }
    this.stepsDone = this.lastCheckpointStep = step;
    this.log(`resumed ${this.saes.length} SAE(s) at step ${step} from ${this.runDir}`);
    return true;
  }

  private checkResumable(sae: SaeRun, ckpt: Checkpoint): void {
    const was = ckpt.meta.config as { sae?: SaeSpec; dModel?: number };
    const key = `trainer.saes.${sae.index}`;
    if (was.dModel !== undefined && was.dModel !== this.cfg.dModel) {
      throw ConfigError.at("trainer.dModel", `${this.cfg.dModel}, but the checkpoint of ${sae.spec.name} was trained at ${was.dModel}`);
    }
    if (was.sae && was.sae.recipe !== sae.spec.recipe) {
      throw ConfigError.at(`${key}.recipe`, `${sae.spec.recipe}, but its checkpoint was trained as ${was.sae.recipe}`);
    }
  }

  /** Opens every SAE's session once the first batch tells the input dtype. */
  private async openSessions(dtype: Batch["dtype"]): Promise<void> {
    this.input = dtype === "fp16" ? "fp16" : "fp32";
    for (const sae of this.saes) await this.sessionFor(sae);
    this.markReady();
  }

  /** Steps over which k anneals from kStart; 0 when it does not. */
  private annealSteps(spec: SaeSpec): number {
    return spec.kStart > spec.k ? Math.floor(this.cfg.kAnnealFraction * this.cfg.steps) : 0;
  }

  private kAt(spec: SaeSpec): number {
    return activeK({ k: spec.k, kStart: spec.kStart, annealSteps: this.annealSteps(spec) }, this.stepsDone);
  }

  /**
   * The SAE's session for the current step: while k anneals, a dense graph fed k (early k is large);
   * after, one built for k. The state moves from one to the other.
   */
  private async sessionFor(sae: SaeRun): Promise<StepSession> {
    const annealK = this.stepsDone < this.annealSteps(sae.spec);
    if (sae.session?.spec.annealK === annealK) return sae.session;
    const state = sae.current();
    await sae.session?.release();
    sae.session = undefined;
    const spec: StepSpec = {
      recipe: sae.recipe,
      batchSize: this.cfg.batchSize,
      dModel: this.cfg.dModel,
      width: sae.spec.width,
      k: annealK ? sae.spec.kStart : sae.spec.k,
      annealK,
      prefixes: sae.spec.recipe === "matryoshka" ? sae.spec.prefixes : [],
      input: this.input ?? "fp32",
      ...this.cfg.adam,
      unitNormDecoder: this.cfg.unitNormDecoder,
      auxK: rankedRecipe(sae.recipe) && sae.spec.auxKCoefficient > 0,
      gradClipNorm: this.cfg.gradClipNorm,
    };
    sae.session = await StepSession.create(spec, state, this.cfg.threads);
    sae.state = undefined;
    return sae.session;
  }

  /** The batch as the graphs' x input; bf16 is widened here since onnxruntime-node takes no bf16. */
  private feed(batch: Batch): ort.Tensor {
    const dims = [batch.rows, batch.dModel];
    if (batch.dtype === "fp16") return new ort.Tensor("float16", batch.data as Uint16Array, dims);
    if (batch.dtype === "fp32") return new ort.Tensor("float32", batch.data as Float32Array, dims);
    this.bf16Rows ??= new Float32Array(batch.data.length);
    return new ort.Tensor("float32", decodeFloats(batch.data, dtypeFromName("bf16"), this.bf16Rows), dims);
  }

  private scalars(sae: SaeRun): StepScalars {
    const { spec } = sae;
    const dead = !rankedRecipe(sae.recipe) || spec.auxKCoefficient === 0 ? [] : sae.dead(this.tokens, this.cfg.deadWindowTokens);
    const kAux = spec.kAux || Math.max(1, Math.floor(this.cfg.dModel / 2));
    return {
      scale: this.scale,
      lr: this.learningRate(spec),
      t: this.stepsDone + 1,
      l1Coef: rampedCoefficient(spec.l1Coefficient, spec.l1WarmupSteps, this.stepsDone),
      k: this.kAt(spec),
      deadIdx: dead,
      auxK: Math.min(kAux, dead.length),
      auxScale: spec.auxKCoefficient * Math.min(dead.length / kAux, 1),
    };
  }

  private learningRate(spec: SaeSpec): number {
    const c = this.cfg;
    return learningRate(
      { peak: spec.lr, steps: c.steps, warmupSteps: c.lrWarmupSteps, decay: c.lrDecay, decayStart: c.lrDecayStart, endRatio: c.lrEndRatio },
      this.stepsDone,
    );
  }

  /** The next batch from the source, refused when its rows do not have the configured width. */
  private async nextBatch(): Promise<Batch | undefined> {
    const batch = await this.options.source.next();
    if (batch && batch.dModel !== this.cfg.dModel) {
      throw ConfigError.at("trainer.dModel", `${this.cfg.dModel}, but batches have rows of width ${batch.dModel}`);
    }
    return batch;
  }

  private async trainStep(batch: Batch, waited: number): Promise<void> {
    if (!this.input) await this.openSessions(batch.dtype);
    if ((batch.dtype === "fp16") !== (this.input === "fp16")) throw new Error(`batch dtype changed mid-run to ${batch.dtype}`);
    const link = linkFrom(batch.traceparent);
    const links: Link[] = link ? [link] : [];
    const span = tracer.startSpan("trainer.step", {
      attributes: { rows: batch.rows, step: this.stepsDone + 1, saes: this.saes.length },
      links,
    });
    const began = performance.now();
    this.torn = true;
    try {
      const x = this.feed(batch);
      const tokensAfter = this.tokens + batch.rows;
      for (const sae of this.saes) {
        const sc = this.scalars(sae);
        const out = await (await this.sessionFor(sae)).run(x, sc);
        sae.window.add(out.stats, out.fires, batch.rows, sc);
        for (let i = 0; i < out.fires.length; i++) if (out.fires[i]! > 0) sae.lastFired[i] = tokensAfter;
        sae.firing.add(out.fires, batch.rows, this.stepsDone + 1);
        const minAct = out.stats[STAT.minAct]!;
        if ((sae.spec.recipe === "batchtopk" || sae.spec.recipe === "matryoshka") && minAct > 0 && minAct < 1e38) {
          sae.thresholdEma = sae.thresholdEma === 0 ? minAct : sae.thresholdEma + this.cfg.thresholdEmaRate * (minAct - sae.thresholdEma);
        }
      }
      this.keepForCalibration(batch, x);
      this.stepsDone += 1;
      this.tokens = tokensAfter;
      this.waitMs += waited;
      this.windowWaitMs += waited;
      this.windowRows += batch.rows;
      this.torn = false;
    } finally {
      span.end();
    }
    this.meters.step(
      performance.now() - began,
      batch.rows,
      waited,
      this.saes.map((s) => s.spec.name),
    );
    if (this.stepsDone % this.cfg.logEvery === 0 || this.stepsDone === this.cfg.steps) this.logWindow();
    if (this.cfg.checkpointEvery > 0 && this.stepsDone % this.cfg.checkpointEvery === 0) this.checkpointAll();
  }

  /** The most recent batches, enough for the JumpReLU calibration, when an SAE will need it. */
  private keepForCalibration(batch: Batch, x: ort.Tensor): void {
    if (!this.saes.some((s) => s.spec.recipe === "jumprelu")) return;
    const keep = Math.ceil(this.cfg.jumprelu.calibrationTokens / this.cfg.batchSize);
    const own = batch.dtype === "bf16" ? new ort.Tensor("float32", Float32Array.from(x.data as Float32Array), x.dims) : x;
    this.calibration.push(own);
    if (this.calibration.length > keep) this.calibration.shift();
  }

  private logWindow(): void {
    const now = performance.now();
    const seconds = (now - this.windowStartedAt) / 1000;
    for (const sae of this.saes) {
      if (sae.window.empty) continue;
      const m: WindowMetrics = {
        sae: sae.spec.name,
        step: this.stepsDone,
        tokens: this.tokens,
        ...sae.window.take(),
        dead_fraction: sae.dead(this.tokens, this.cfg.deadWindowTokens).length / sae.spec.width,
        tokens_per_second: seconds > 0 ? this.windowRows / seconds : 0,
        wait_ms: this.windowWaitMs,
        elapsed_s: (now - this.startedAt) / 1000,
      };
      sae.latest = m;
      sae.metrics.append(m);
      this.meters.window(m);
      this.log(
        `${sae.spec.name} step ${m.step}/${this.cfg.steps} loss ${m.loss.toPrecision(4)} mse ${m.mse.toPrecision(4)} ev ${m.explained_variance.toFixed(3)} ` +
          `l0 ${m.l0.toFixed(1)} dead ${(100 * m.dead_fraction).toFixed(1)}% ${Math.round(m.tokens_per_second)} tok/s`,
      );
    }
    this.windowRows = 0;
    this.windowWaitMs = 0;
    this.windowStartedAt = now;
  }

  /** Writes every SAE's checkpoint at the current step. Call under the lock. */
  private checkpointAll(): string[] {
    const span = tracer.startSpan("trainer.checkpoint", { attributes: { step: this.stepsDone } });
    try {
      const paths = this.saes.map((sae) =>
        saveCheckpoint(
          sae.checkpointDir,
          {
            meta: {
              step: this.stepsDone,
              tokens: this.tokens,
              rng: sae.rng.state,
              scale: this.scale,
              thresholdEma: sae.thresholdEma,
              firedTokens: [sae.firing.current.tokens, sae.firing.previous.tokens],
              config: {
                sae: sae.spec,
                dModel: this.cfg.dModel,
                hookPoint: this.cfg.hookPoint,
                batchSize: this.cfg.batchSize,
                adam: this.cfg.adam,
              },
            },
            state: sae.current(),
            lastFired: sae.lastFired,
            fired: [sae.firing.current.fired, sae.firing.previous.fired],
          },
          sae.recipe,
          sae.spec.width,
          this.cfg.dModel,
          this.cfg.keepCheckpoints,
        ),
      );
      this.lastCheckpointStep = this.stepsDone;
      return paths;
    } finally {
      span.end();
    }
  }

  /** SAELens exports of every SAE. Call under the lock. */
  private async exportAll(): Promise<string[]> {
    const span = tracer.startSpan("trainer.export", { attributes: { step: this.stepsDone } });
    try {
      const producer = this.options.config.producer;
      const out: string[] = [];
      for (const sae of this.saes) {
        const { spec } = sae;
        const state = sae.current();
        const firing = sae.firing.latest();
        const info: ExportInfo = {
          architecture: EXPORTED_AS[spec.recipe],
          k: spec.k,
          scale: this.scale,
          foldDecoderNorm: !this.cfg.unitNormDecoder,
          firing,
          hookName: this.cfg.hookPoint,
          modelName: this.cfg.modelName || basename(dirname(producer.model)),
          contextSize: producer.contextLength,
          prependBos: producer.prependBos,
          provenance: {
            recipe: spec.recipe,
            run_id: this.options.config.run.id,
            steps: this.stepsDone,
            tokens: this.tokens,
            k: spec.k,
            lr: spec.lr,
            ...(spec.recipe === "matryoshka" ? { prefixes: spec.prefixes } : {}),
            normalisation_scale_folded: this.scale,
            decoder_norms_folded: !this.cfg.unitNormDecoder,
            sparsity_tokens: firing.tokens,
          },
        };
        if (spec.recipe === "batchtopk" || spec.recipe === "matryoshka") {
          // The running threshold is on the score latents were ranked by, relu(pre) x |W_dec_i| when decoder
          // norms are free, so latent i's threshold on its pre-activation is theta / |W_dec_i|.
          const norms = this.cfg.unitNormDecoder ? new Float32Array(spec.width).fill(1) : decoderNorms(state, spec.width, this.cfg.dModel);
          info.threshold = Float32Array.from(norms, (c) => sae.thresholdEma / Math.max(c, 1e-12));
        }
        if (spec.recipe === "jumprelu") info.threshold = await this.calibrate(sae, state);
        out.push(exportSaeLens(sae.exportDir, state, spec.width, this.cfg.dModel, info));
      }
      return out;
    } finally {
      span.end();
    }
  }

  private async calibrate(sae: SaeRun, state: SaeState): Promise<Float32Array> {
    const want = Math.ceil(this.cfg.jumprelu.calibrationTokens / this.cfg.batchSize);
    while (this.calibration.length < want && !this.stopping) {
      const batch = await this.nextBatch();
      if (!batch) break;
      this.keepForCalibration(batch, this.feed(batch));
    }
    if (this.calibration.length === 0)
      throw new Error(`${sae.spec.name}: the JumpReLU conversion needs calibration batches and none were seen`);
    const spec = {
      batchSize: this.cfg.batchSize,
      dModel: this.cfg.dModel,
      width: sae.spec.width,
      k: sae.spec.k,
      input: this.input ?? "fp32",
    };
    return jumpReluThresholds(spec, state, this.scale, this.calibration, this.cfg.threads);
  }

  private async finish(): Promise<RunResult> {
    this.serviceState = ServiceState.DRAINING;
    const result = await this.lock.run(async () => {
      if (!this.saes.every((s) => s.session || s.state)) return { step: this.stepsDone, checkpoints: [], exports: [] };
      if (this.saes.some((s) => !s.window.empty)) this.logWindow();
      const checkpoints = this.saes.map((s) => checkpointPath(s.checkpointDir, this.stepsDone));
      if (this.lastCheckpointStep !== this.stepsDone) this.checkpointAll();
      const exports = this.exportAtEnd ? await this.exportAll() : [];
      return { step: this.stepsDone, checkpoints, exports };
    });
    this.serviceState = ServiceState.STOPPED;
    this.log(`stopped at step ${result.step}; checkpoints in ${this.runDir}`);
    return result;
  }

  private async unpaused(): Promise<void> {
    while (this.paused && !this.stopping) await new Promise<void>((resolve) => this.wakers.push(resolve));
  }

  private wake(): void {
    const wakers = this.wakers;
    this.wakers = [];
    for (const w of wakers) w();
  }

  pause(): ServiceState {
    if (this.serviceState === ServiceState.RUNNING || this.serviceState === ServiceState.STARTING) {
      this.paused = true;
      if (this.serviceState === ServiceState.RUNNING) this.serviceState = ServiceState.PAUSED;
    }
    return this.serviceState;
  }

  resume(): ServiceState {
    if (this.paused) {
      this.paused = false;
      if (this.serviceState === ServiceState.PAUSED) this.serviceState = ServiceState.RUNNING;
      this.wake();
    }
    return this.serviceState;
  }

  /** Checkpoints every SAE now, between steps. */
  checkpointNow(): Promise<{ paths: string[]; step: number }> {
    return this.lock.run(async () => ({ paths: this.checkpointAll(), step: this.stepsDone }));
  }

  /** Stops after the step in flight; checkpoints, exports unless asked not to, and settles with what it wrote. */
  stop(options: { skipExport: boolean }): Promise<RunResult> {
    this.stopping = true;
    this.exportAtEnd = !options.skipExport;
    this.options.source.close();
    this.wake();
    return this.run();
  }

  report(): { waitMs: number; wallMs: number; saes: SaeReport[] } {
    return {
      waitMs: this.waitMs,
      wallMs: this.startedAt ? performance.now() - this.startedAt : 0,
      saes: this.saes.map((sae) => ({
        name: sae.spec.name,
        recipe: sae.spec.recipe,
        step: this.stepsDone,
        tokens: this.tokens,
        latest: sae.latest,
        deadFraction: sae.dead(this.tokens, this.cfg.deadWindowTokens).length / sae.spec.width,
        learningRate: this.learningRate(sae.spec),
      })),
    };
  }
}
