import { type Link, trace } from "@opentelemetry/api";
import { join } from "node:path";
import type ort from "onnxruntime-node";
import { ConfigError, type RunConfig } from "../common/config/index.js";
import type { SaeSpec } from "../common/config/sections/trainer.js";
import { decodeFloats, dtypeFromName } from "../common/tensor-codec.js";
import { linkFrom } from "../common/telemetry.js";
import type { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import { type Batch, type BatchSource, batchTensor, floatTensor, halfWords } from "./batches.js";
import { CalibrationCache } from "./calibration.js";
import { checkpointPath, checkpointSteps, loadCheckpoint, saveCheckpoint } from "./checkpoint.js";
import { RunControl } from "./control.js";
import { exportSaeLens } from "./export.js";
import { checkWidth, type HookConfig, hookConfig, hookDir, processHookPoints, widthKey } from "./hook.js";
import type { StepSpec } from "./graph/step.js";
import { MetricWindows, type WindowMetrics } from "./metrics.js";
import { type Placement, placementOf, wordsOnDevice } from "./placement.js";
import type { StepScalars } from "./reference.js";
import { type Progress, SaeRun } from "./sae-run.js";
import { initialBDec, initState, normalisationScale } from "./sae.js";
import { activeK, learningRate } from "./schedule.js";
import type { StepSession } from "./session.js";

const tracer = trace.getTracer("saeflow.trainer");

export interface TrainingOptions {
  config: RunConfig;
  source: BatchSource;
  /** The hook point trained on; the first of the process's (trainer.hookPoints, shardIndex, shardCount) when absent. */
  hookPoint?: string;
  /** Progress and problem lines (one per SAE every logEvery steps); none when absent. */
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

/**
 * A training run of one hook point: one stream of batches, one or several SAEs trained on each batch, metrics every
 * logEvery steps, checkpoints that resume bit for bit, SAELens export at the end. startTrainer
 * serves it over gRPC; tests and tools use it in-process.
 */
export class Training {
  private readonly cfg: HookConfig;
  private readonly saes: SaeRun[];
  private readonly lock = new Lock();
  private readonly control = new RunControl();
  private readonly windows: MetricWindows;
  private readonly calibration: CalibrationCache;
  private readonly log: (line: string) => void;
  private readonly place: Placement;
  private stepsDone = 0;
  private tokens = 0;
  private scale = 1;
  /** Element type of the step graphs' input, set by the first batch trained on. */
  private input: StepSpec["input"] | undefined;
  /** Element type of the batches, set by the first one; a run refuses another. */
  private batchDtype: Batch["dtype"] | undefined;
  private sessionsOpen = false;
  /** Rows widened to float32 for the step, reused by every step. */
  private wideRows: Float32Array | undefined;
  private lastCheckpointStep = -1;
  /** A step is under way: some SAEs of the sweep may have moved and others not. */
  private torn = false;
  private exportAtEnd: boolean;
  private running: Promise<RunResult> | undefined;
  private markReady!: () => void;
  /** Settles once every SAE has a session, i.e. training can proceed. */
  readonly ready = new Promise<void>((resolve) => (this.markReady = resolve));

  constructor(private readonly options: TrainingOptions) {
    this.cfg = hookConfig(options.config, options.hookPoint ?? processHookPoints(options.config)[0]!);
    this.log = options.log ?? (() => undefined);
    this.place = placementOf(this.cfg);
    this.exportAtEnd = this.cfg.exportOnFinish;
    this.saes = this.cfg.saes.map((spec, i) => new SaeRun(spec, i, join(this.dir, spec.name), options.config.run.seed, this.cfg));
    this.windows = new MetricWindows(
      this.saes.map((s) => ({ name: s.spec.name, metricsPath: s.metricsPath })),
      this.cfg.steps,
      this.log,
    );
    this.calibration = new CalibrationCache(this.cfg, this.place);
  }

  get state(): ServiceState {
    return this.control.state;
  }

  get hookPoint(): string {
    return this.cfg.hookPoint;
  }

  /** The folder of this hook point's SAEs (see hookDir). */
  get dir(): string {
    return hookDir(this.options.config, this.cfg.hookPoint);
  }

  /** Every SAE has had its session opened, so there is a state to checkpoint. */
  get initialised(): boolean {
    return this.sessionsOpen;
  }

  private get progress(): Progress {
    return { step: this.stepsDone, tokens: this.tokens, scale: this.scale };
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
    try {
      if (!this.restore()) {
        throw ConfigError.at("run.dir", `${this.dir} holds no checkpoint of ${this.saes.map((s) => s.spec.name).join(", ")}`);
      }
      return await this.lock.run(() => this.exportAll());
    } finally {
      this.options.source.close();
    }
  }

  private async train(): Promise<RunResult> {
    try {
      const pending = this.cfg.resume && this.restore() ? [] : await this.initialise();
      this.windows.start();
      this.control.started();
      while (this.stepsDone < this.cfg.steps && !this.control.stopAsked) {
        await this.control.unpaused();
        if (this.control.stopAsked) break;
        const asked = performance.now();
        const batch = pending.shift() ?? (await this.nextBatch());
        const waited = performance.now() - asked;
        if (!batch) break;
        // A pause that came while the batch was awaited holds it until resumed (or stopped).
        await this.control.unpaused();
        await this.lock.run(() => this.trainStep(batch, waited));
      }
      return await this.finish();
    } catch (err) {
      this.control.stopped();
      await this.emergencyCheckpoint();
      throw err;
    } finally {
      this.options.source.close();
      await this.closeSessions();
    }
  }

  /** Lets go of every SAE's session, each state read back to the host; a failure to is logged, not thrown over the run's outcome. */
  private async closeSessions(): Promise<void> {
    for (const sae of this.saes) {
      try {
        await sae.close();
      } catch (err) {
        this.log(`${sae.spec.name}: reading its state back from ${this.place.provider} failed: ${(err as Error).message}`);
      }
    }
  }

  /**
   * After a failure, checkpoints the step reached unless it is already on disk. A step that failed
   * part-way may have moved some SAEs of the sweep and not others: the last checkpoint stays then,
   * rather than a torn one.
   */
  private async emergencyCheckpoint(): Promise<void> {
    if (!this.initialised || this.torn || this.lastCheckpointStep === this.stepsDone) return;
    try {
      await this.lock.run(() => this.checkpointAll());
    } catch (err) {
      const names = this.saes.map((s) => s.spec.name).join(", ");
      this.log(`the checkpoint of ${names} at step ${this.stepsDone} in ${this.dir} failed: ${(err as Error).message}`);
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
    for (const sae of this.saes) {
      sae.state = initState(sae.spec.width, d, sae.rng, bDec, {
        decoderNorm: this.cfg.decoderInitNorm,
        recipe: sae.rules.step,
        threshold: sae.spec.jumpreluInitThreshold,
      });
    }
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
      const none = missing.length ? ` (${missing.join(", ")} hold none)` : "";
      throw ConfigError.at(
        "trainer.resume",
        `the SAEs of the sweep hold no checkpoint at a common step${none}; remove their checkpoints or set trainer.resume=false`,
      );
    }
    for (const sae of this.saes) {
      const ckpt = loadCheckpoint(checkpointPath(sae.checkpointDir, step), sae.rules.step, sae.spec.width, this.cfg.dModel);
      this.checkResumable(sae, ckpt.meta.config as { sae?: SaeSpec; dModel?: number });
      sae.restore(ckpt);
      this.scale = ckpt.meta.scale;
      this.tokens = ckpt.meta.tokens;
    }
    this.stepsDone = this.lastCheckpointStep = step;
    this.log(`resumed ${this.saes.length} SAE(s) at step ${step} from ${this.dir}`);
    return true;
  }

  private checkResumable(sae: SaeRun, was: { sae?: SaeSpec; dModel?: number }): void {
    if (was.dModel !== undefined && was.dModel !== this.cfg.dModel) {
      throw ConfigError.at(
        widthKey(this.options.config, this.cfg.hookPoint),
        `${this.cfg.dModel} for ${this.cfg.hookPoint}, but the checkpoint of ${sae.spec.name} was trained at ${was.dModel}`,
      );
    }
    const trainedAs = was.sae?.recipe;
    if (trainedAs && trainedAs !== sae.spec.recipe) {
      throw ConfigError.at(`trainer.saes.${sae.index}.recipe`, `${sae.spec.recipe}, but its checkpoint was trained as ${trainedAs}`);
    }
  }

  /**
   * Opens every SAE's session once the first batch tells the input dtype. A GPU step widens 16-bit
   * rows itself, fed as word pairs (half the bytes cross the bus); the CPU step casts fp16 in the
   * graph and takes bf16 widened (onnxruntime-node has no bf16 tensor).
   */
  private async openSessions(dtype: Batch["dtype"]): Promise<void> {
    this.batchDtype = dtype;
    if (dtype === "fp32") this.input = "fp32";
    else if (wordsOnDevice(this.place, this.cfg.dModel)) this.input = `${dtype}-words`;
    else this.input = dtype === "fp16" && this.place.provider === "cpu" ? "fp16" : "fp32";
    for (const sae of this.saes) await this.sessionFor(sae);
    this.sessionsOpen = true;
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
    const spec: StepSpec = {
      recipe: sae.rules.step,
      batchSize: this.cfg.batchSize,
      dModel: this.cfg.dModel,
      width: sae.spec.width,
      k: annealK ? sae.spec.kStart : sae.spec.k,
      annealK,
      prefixes: sae.rules.nested ? sae.spec.prefixes : [],
      input: this.input ?? "fp32",
      ...this.cfg.adam,
      unitNormDecoder: this.cfg.unitNormDecoder,
      auxK: sae.rules.ranked && sae.spec.auxKCoefficient > 0,
      jumpRelu: sae.jumpRelu,
      gradClipNorm: this.cfg.gradClipNorm,
      int32Index: this.place.provider === "webgpu",
    };
    return sae.open(spec, this.place);
  }

  private scalars(sae: SaeRun): StepScalars {
    const at = { step: this.stepsDone, tokens: this.tokens, scale: this.scale, lr: this.learningRate(sae.spec), k: this.kAt(sae.spec) };
    return sae.scalars(at);
  }

  private learningRate(spec: SaeSpec): number {
    const c = this.cfg;
    return learningRate(
      { peak: spec.lr, steps: c.steps, warmupSteps: c.lrWarmupSteps, decay: c.lrDecay, decayStart: c.lrDecayStart, endRatio: c.lrEndRatio },
      this.stepsDone,
    );
  }

  /** The next batch from the source, refused when its rows do not have the pool's width. */
  private async nextBatch(): Promise<Batch | undefined> {
    const batch = await this.options.source.next();
    if (batch) checkWidth(this.options.config, this.cfg.hookPoint, batch.dModel, "the batches have");
    return batch;
  }

  /** The batch as the step graphs' input: word pairs for a GPU step, or as it came, or widened into rows every step reuses. */
  private feed(batch: Batch): ort.Tensor {
    if (this.input === "fp16-words" || this.input === "bf16-words") return halfWords(batch);
    if (this.input === "fp32" && batch.dtype !== "fp32") return floatTensor(batch, (this.wideRows ??= new Float32Array(batch.data.length)));
    return batchTensor(batch);
  }

  private async trainStep(batch: Batch, waited: number): Promise<void> {
    if (!this.input) await this.openSessions(batch.dtype);
    if (batch.dtype !== this.batchDtype) throw new Error(`batch dtype changed mid-run from ${this.batchDtype} to ${batch.dtype}`);
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
      const after = { step: this.stepsDone + 1, tokens: this.tokens + batch.rows };
      for (const sae of this.saes) {
        const sc = this.scalars(sae);
        const out = await (await this.sessionFor(sae)).run(x, sc);
        this.windows.add(sae.index, out.stats, out.fires, batch.rows, sc);
        sae.observe(out, batch.rows, after, this.cfg.thresholdEmaRate);
      }
      this.calibration.keep(batch);
      this.stepsDone = after.step;
      this.tokens = after.tokens;
      this.torn = false;
    } finally {
      span.end();
    }
    this.windows.stepped(performance.now() - began, batch.rows, waited);
    if (this.stepsDone % this.cfg.logEvery === 0 || this.stepsDone === this.cfg.steps) this.logWindow();
    if (this.cfg.checkpointEvery > 0 && this.stepsDone % this.cfg.checkpointEvery === 0) await this.checkpointAll();
  }

  private logWindow(): void {
    this.windows.take(this.progress, (i) => this.deadFraction(this.saes[i]!));
  }

  private deadFraction(sae: SaeRun): number {
    return sae.dead(this.tokens, this.cfg.deadWindowTokens).length / sae.spec.width;
  }

  /** Writes every SAE's checkpoint at the current step, its state read back from the device first. Call under the lock. */
  private async checkpointAll(): Promise<string[]> {
    const span = tracer.startSpan("trainer.checkpoint", { attributes: { step: this.stepsDone } });
    try {
      const c = this.cfg;
      const paths: string[] = [];
      for (const sae of this.saes) {
        const ckpt = sae.checkpoint(this.progress, await sae.read());
        paths.push(saveCheckpoint(sae.checkpointDir, ckpt, sae.rules.step, sae.spec.width, c.dModel, c.keepCheckpoints));
      }
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
      const out: string[] = [];
      for (const sae of this.saes) {
        const state = await sae.read();
        const info = sae.exportInfo(this.options.config, this.progress, state);
        if (sae.rules.calibrates) {
          const next = async () => (this.control.stopAsked ? undefined : this.nextBatch());
          info.threshold = await this.calibration.thresholds(sae.spec, state, this.scale, next);
        }
        out.push(exportSaeLens(sae.exportDir, state, sae.spec.width, this.cfg.dModel, info));
      }
      return out;
    } finally {
      span.end();
    }
  }

  private async finish(): Promise<RunResult> {
    this.control.draining();
    const result = await this.lock.run(async () => {
      if (!this.saes.every((s) => s.session || s.state)) return { step: this.stepsDone, checkpoints: [], exports: [] };
      if (this.windows.pending) this.logWindow();
      const checkpoints = this.saes.map((s) => checkpointPath(s.checkpointDir, this.stepsDone));
      if (this.lastCheckpointStep !== this.stepsDone) await this.checkpointAll();
      const exports = this.exportAtEnd ? await this.exportAll() : [];
      return { step: this.stepsDone, checkpoints, exports };
    });
    this.control.stopped();
    this.log(`stopped at step ${result.step}; checkpoints in ${this.dir}`);
    return result;
  }

  /** Holds the loop before its next step; settles once no step is in flight, so that none runs after it until resume(). */
  async pause(): Promise<ServiceState> {
    this.control.pause();
    await this.lock.run(async () => undefined);
    return this.control.state;
  }

  resume(): ServiceState {
    return this.control.resume();
  }

  /** Checkpoints every SAE now, between steps. */
  checkpointNow(): Promise<{ paths: string[]; step: number }> {
    return this.lock.run(async () => ({ paths: await this.checkpointAll(), step: this.stepsDone }));
  }

  /** Stops after the step in flight; checkpoints, exports unless asked not to, and settles with what it wrote. */
  stop(options: { skipExport: boolean }): Promise<RunResult> {
    this.exportAtEnd = !options.skipExport;
    this.control.stop();
    this.options.source.close();
    return this.run();
  }

  report(): { waitMs: number; wallMs: number; saes: SaeReport[] } {
    return {
      waitMs: this.windows.waitMs,
      wallMs: this.windows.wallMs,
      saes: this.saes.map((sae) => ({
        name: sae.spec.name,
        recipe: sae.spec.recipe,
        step: this.stepsDone,
        tokens: this.tokens,
        latest: this.windows.latest(sae.index),
        deadFraction: this.deadFraction(sae),
        learningRate: this.learningRate(sae.spec),
      })),
    };
  }
}
