import { basename, dirname, join } from "node:path";
import type { RunConfig } from "../common/config/index.js";
import { RECIPES, type RecipeRules } from "../common/config/recipes.js";
import type { SaeSpec } from "../common/config/sections/trainer.js";
import { type Checkpoint, firingOf } from "./checkpoint.js";
import type { ExportInfo } from "./export.js";
import { FiringWindows } from "./firing.js";
import { type JumpReluSpec, STAT, type StepSpec } from "./graph/step.js";
import type { HookConfig } from "./hook.js";
import type { Placement } from "./placement.js";
import type { StepScalars } from "./reference.js";
import { Rng } from "./rng.js";
import { decoderNorms, type SaeState, stateTensor } from "./sae.js";
import { rampedCoefficient } from "./schedule.js";
import { type StepOutputs, StepSession } from "./session.js";

/** Where a sweep stands: what a checkpoint and an export record of it. */
export interface Progress {
  step: number;
  tokens: number;
  /** Normalisation factor x -> x * scale. */
  scale: number;
}

/** One SAE of a sweep: its state (or the session holding it), dead-latent record, firing counts and folders. */
export class SaeRun {
  /** The step graph in use: a dense one fed k while k anneals, then one built for k. */
  session: StepSession | undefined;
  /** The state while no session holds it (before the first step, after a restore). */
  state: SaeState | undefined;
  rng: Rng;
  lastFired: Float64Array;
  readonly firing: FiringWindows;
  /** batchtopk, matryoshka: the running minimum kept score, the threshold their export infers with. */
  thresholdEma = 0;
  readonly rules: RecipeRules;

  constructor(
    readonly spec: SaeSpec,
    readonly index: number,
    readonly dir: string,
    seed: number,
    private readonly cfg: HookConfig,
  ) {
    this.rng = new Rng(seed, spec.name);
    this.rules = RECIPES[spec.recipe];
    this.lastFired = new Float64Array(spec.width);
    this.firing = new FiringWindows(spec.width, Math.ceil(cfg.sparsityWindowTokens / cfg.batchSize), cfg.steps);
  }

  get checkpointDir(): string {
    return join(this.dir, "checkpoints");
  }

  get exportDir(): string {
    return join(this.dir, "sae_lens");
  }

  get metricsPath(): string {
    return join(this.dir, "metrics.jsonl");
  }

  /** jumprelu_trained's terms, as its step graph is built with them; undefined for the other recipes. */
  get jumpRelu(): JumpReluSpec | undefined {
    const { spec } = this;
    if (!this.rules.thresholded) return undefined;
    return {
      bandwidth: spec.jumpreluBandwidth,
      sparsityLoss: spec.jumpreluSparsityLossMode,
      tanhScale: spec.jumpreluTanhScale,
      preActLoss: spec.preActLossCoefficient > 0,
    };
  }

  /**
   * What this SAE's step from `at.step` is fed: the learning rate and k given, its sparsity weight
   * warmed up (L1, or jumprelu_trained's L0), and the dead latents where a term of its revives them
   * (AuxK, or the pre-activation loss).
   */
  scalars(at: { step: number; tokens: number; scale: number; lr: number; k: number }): StepScalars {
    const { spec, rules, cfg } = this;
    const revives = (rules.ranked && spec.auxKCoefficient > 0) || (rules.thresholded && spec.preActLossCoefficient > 0);
    const dead = revives ? this.dead(at.tokens, cfg.deadWindowTokens) : [];
    const kAux = spec.kAux || Math.max(1, Math.floor(cfg.dModel / 2));
    const [coefficient, warmup] = rules.thresholded ? [spec.l0Coefficient, spec.l0WarmupSteps] : [spec.l1Coefficient, spec.l1WarmupSteps];
    return {
      scale: at.scale,
      lr: at.lr,
      t: at.step + 1,
      sparsityCoef: rampedCoefficient(coefficient, warmup, at.step),
      preActCoef: spec.preActLossCoefficient,
      k: at.k,
      deadIdx: dead,
      auxK: Math.min(kAux, dead.length),
      auxScale: spec.auxKCoefficient * Math.min(dead.length / kAux, 1),
    };
  }

  /** Latents that have not fired within the dead window. */
  dead(tokens: number, window: number): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.lastFired.length; i++) if (tokens - this.lastFired[i]! >= window) out.push(i);
    return out;
  }

  /** The current state on the host, read back from the device where a session holds it there (checkpoints, exports). */
  async read(): Promise<SaeState> {
    const s = this.session ? await this.session.readState() : this.state;
    if (!s) throw new Error(`SAE ${this.spec.name} is not initialised`);
    return s;
  }

  /** Moves the state into a new session running `spec` on `placement`, letting go of the one before. */
  async open(spec: StepSpec, placement: Placement): Promise<StepSession> {
    await this.close();
    const state = this.state;
    if (!state) throw new Error(`SAE ${this.spec.name} is not initialised`);
    this.session = await StepSession.create(spec, state, placement.threads, placement);
    this.state = undefined;
    return this.session;
  }

  /**
   * Lets go of the session; the state, read back, stays with this SAE. A device that fails to give
   * it back loses it: the newest checkpoint is then where the run resumes.
   */
  async close(): Promise<void> {
    const session = this.session;
    if (!session) return;
    this.session = undefined;
    try {
      this.state = await session.readState();
    } finally {
      await session.close();
    }
  }

  /** Records the step that brought the run to `step` and `tokens`: firings, and the running threshold. */
  observe(out: StepOutputs, rows: number, progress: { step: number; tokens: number }, emaRate: number): void {
    for (let i = 0; i < out.fires.length; i++) if (out.fires[i]! > 0) this.lastFired[i] = progress.tokens;
    this.firing.add(out.fires, rows, progress.step);
    const minAct = out.stats[STAT.minAct]!;
    if (this.rules.batchThreshold && minAct > 0 && minAct < 1e38) {
      this.thresholdEma = this.thresholdEma === 0 ? minAct : this.thresholdEma + emaRate * (minAct - this.thresholdEma);
    }
  }

  /** Takes up where `ckpt` left off. */
  restore(ckpt: Checkpoint): void {
    this.state = ckpt.state;
    this.lastFired = ckpt.lastFired;
    [this.firing.current, this.firing.previous] = firingOf(ckpt);
    this.rng = Rng.fromState(ckpt.meta.rng);
    this.thresholdEma = ckpt.meta.thresholdEma;
  }

  /** This SAE's checkpoint of `state` (read by read()) at `at`. */
  checkpoint(at: Progress, state: SaeState): Checkpoint {
    const { cfg } = this;
    return {
      meta: {
        step: at.step,
        tokens: at.tokens,
        rng: this.rng.state,
        scale: at.scale,
        thresholdEma: this.thresholdEma,
        firedTokens: [this.firing.current.tokens, this.firing.previous.tokens],
        config: { sae: this.spec, dModel: cfg.dModel, hookPoint: cfg.hookPoint, batchSize: cfg.batchSize, adam: cfg.adam },
      },
      state,
      lastFired: this.lastFired,
      fired: [this.firing.current.fired, this.firing.previous.fired],
    };
  }

  /**
   * What the SAELens export of this SAE's `state` at `at` says of it; with the running threshold of the
   * recipes that keep one, or the trained one. A calibrated threshold (JumpReLU converted) is the caller's to add.
   */
  exportInfo(config: RunConfig, at: Progress, state: SaeState): ExportInfo {
    const { spec, cfg } = this;
    const firing = this.firing.latest();
    const info: ExportInfo = {
      architecture: this.rules.exportsAs,
      k: spec.k,
      scale: at.scale,
      foldDecoderNorm: !cfg.unitNormDecoder,
      firing,
      hookName: cfg.hookPoint,
      modelName: cfg.modelName || basename(dirname(config.producer.model)),
      contextSize: config.producer.contextLength,
      prependBos: config.producer.prependBos,
      provenance: {
        recipe: spec.recipe,
        run_id: config.run.id,
        steps: at.step,
        tokens: at.tokens,
        k: spec.k,
        lr: spec.lr,
        ...(this.rules.nested ? { prefixes: spec.prefixes } : {}),
        ...(this.rules.thresholded
          ? {
              l0_coefficient: spec.l0Coefficient,
              l0_warm_up_steps: spec.l0WarmupSteps,
              jumprelu_bandwidth: spec.jumpreluBandwidth,
              jumprelu_init_threshold: spec.jumpreluInitThreshold,
              jumprelu_sparsity_loss_mode: spec.jumpreluSparsityLossMode,
              jumprelu_tanh_scale: spec.jumpreluTanhScale,
              pre_act_loss_coefficient: spec.preActLossCoefficient,
            }
          : {}),
        normalisation_scale_folded: at.scale,
        decoder_norms_folded: !cfg.unitNormDecoder,
        sparsity_tokens: firing.tokens,
      },
    };
    if (this.rules.batchThreshold) {
      // The running threshold is on the score latents were ranked by, relu(pre) x |W_dec_i| when decoder
      // norms are free, so latent i's threshold on its pre-activation is theta / |W_dec_i|.
      const norms = cfg.unitNormDecoder ? new Float32Array(spec.width).fill(1) : decoderNorms(state, spec.width, cfg.dModel);
      info.threshold = Float32Array.from(norms, (c) => this.thresholdEma / Math.max(c, 1e-12));
    }
    // A trained JumpReLU infers with the threshold it trained with, relu(theta), on the same pre-activations.
    if (this.rules.thresholded) info.threshold = Float32Array.from(stateTensor(state, "threshold"), (v) => Math.max(v, 0));
    return info;
  }
}
