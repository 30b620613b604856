import ort from "onnxruntime-node";
import { STEP_RECIPES } from "../common/config/recipes.js";
import { openOrtSession, ortDeviceSessionOptions, ortSessionOptions } from "../common/ort.js";
import { DeviceStateHolder } from "./device-state.js";
import {
  buildStepGraph,
  buildStepStages,
  nextName,
  type ParamName,
  paramsOf,
  STAT_COUNT,
  type Stage,
  type StateName,
  stateOf,
  stateShape,
  type StepSpec,
} from "./graph/step.js";
import { keepsState, onCpu, type Placement, PROVIDER_KEY } from "./placement.js";
import type { StepScalars } from "./reference.js";
import { allocState, type SaeState, stateTensor } from "./sae.js";

/** What one step reports besides the new state. Arrays are reused by the next step: copy to keep. */
export interface StepOutputs {
  stats: Float32Array;
  fires: Float32Array;
  /** The gradients Adam was given (after clipping); only when the graph was built with gradOutputs. */
  grads?: Partial<Record<ParamName, Float32Array>>;
}

/** Where a step's state lives and how a run reads and replaces it: host buffers, or device tensors. */
export interface StateHolder {
  /** The current state as the step's inputs. */
  inputs(): Record<string, ort.Tensor>;
  /** Where the step writes the next state: preallocated host tensors, or null (the device allocates). */
  fetches(): Record<string, ort.Tensor | null>;
  /** After a run: its next_* outputs become the current state. */
  advance(out: ort.InferenceSession.OnnxValueMapType): void;
  /** The current state on the host; a device holder reads it back (checkpoints, exports). */
  read(): Promise<SaeState>;
  /** The current state when it is on the host without a read-back; undefined otherwise. */
  readonly hostState: SaeState | undefined;
  /** Where each state tensor is, as onnxruntime says ("cpu", "gpu-buffer"). */
  locations(): Record<StateName, ort.Tensor.DataLocation>;
  close(): Promise<void>;
}

/**
 * The state in two sets of host buffers: the step reads one and writes the other, preallocated,
 * and the two swap, so a step allocates nothing of the state's size. On CUDA the step reads and
 * writes them across the bus (onnxruntime-node binds device outputs for WebGPU only).
 */
class HostStateHolder implements StateHolder {
  private spare: SaeState;

  constructor(
    private readonly spec: StepSpec,
    private cur: SaeState,
  ) {
    this.spare = allocState(spec.width, spec.dModel, spec.recipe);
  }

  private tensors(state: SaeState, name: (s: StateName) => string): Record<string, ort.Tensor> {
    const { width: n, dModel: d, recipe } = this.spec;
    return Object.fromEntries(stateOf(recipe).map((s) => [name(s), new ort.Tensor("float32", stateTensor(state, s), stateShape(s, n, d))]));
  }

  inputs = () => this.tensors(this.cur, (s) => s);
  fetches = () => this.tensors(this.spare, nextName);
  advance(): void {
    [this.cur, this.spare] = [this.spare, this.cur];
  }
  read = async () => this.cur;
  get hostState(): SaeState {
    return this.cur;
  }
  locations = () => Object.fromEntries(stateOf(this.spec.recipe).map((s) => [s, "cpu"])) as Record<StateName, ort.Tensor.DataLocation>;
  close = async () => undefined;
}

const scalar = () => new ort.Tensor("float32", new Float32Array(1), []);

/** What runs a step graph: one onnxruntime session, or a chain of them over its stages. */
interface StepRunner {
  run(feeds: Record<string, ort.Tensor>, fetches: Record<string, ort.Tensor | null>): Promise<ort.InferenceSession.OnnxValueMapType>;
  release(): Promise<void>;
}

/**
 * A step graph cut into stages (buildStepStages), one session each, run in turn: serial stages on
 * one thread, the others on `threads`. What a stage hands on is kept from the first run and written
 * in place by the next ones, so nothing of the step's size is allocated or copied per step, except
 * for tensors whose shape follows what is fed (AuxK's dead latents).
 */
class StagedRunner implements StepRunner {
  private readonly held = new Map<string, ort.Tensor>();

  private constructor(private readonly stages: Array<{ stage: Stage; session: ort.InferenceSession }>) {}

  static async open(stages: Stage[], place: Placement): Promise<StagedRunner> {
    const opened: Array<{ stage: Stage; session: ort.InferenceSession }> = [];
    try {
      for (const stage of stages) {
        const options = ortSessionOptions({ ...place, threads: stage.serial ? 1 : place.threads });
        opened.push({ stage, session: await openOrtSession(stage.model, options, place.provider, PROVIDER_KEY) });
      }
    } catch (err) {
      for (const { session } of opened) await session.release();
      throw err;
    }
    return new StagedRunner(opened);
  }

  async run(feeds: Record<string, ort.Tensor>, fetches: Record<string, ort.Tensor | null>): Promise<ort.InferenceSession.OnnxValueMapType> {
    const all: Record<string, ort.Tensor> = {};
    for (const { stage, session } of this.stages) {
      const stageFeeds = Object.fromEntries(stage.inputs.map((name) => [name, feeds[name] ?? this.held.get(name)!]));
      const kept = (name: string) => (stage.varying.includes(name) ? null : (this.held.get(name) ?? null));
      const stageFetches = Object.fromEntries(stage.outputs.map((name) => [name, name in fetches ? fetches[name]! : kept(name)]));
      const out = await session.run(stageFeeds, stageFetches);
      for (const name of stage.outputs) {
        if (!(name in fetches)) this.held.set(name, out[name]!);
        all[name] = out[name]!;
      }
    }
    return all;
  }

  async release(): Promise<void> {
    for (const { session } of this.stages) await session.release();
  }
}

/**
 * An onnxruntime session running one SAE's step graph on its placement, with the SAE's state: on
 * the host for the CPU (and CUDA), on the device for WebGPU, where per step only the batch goes up
 * and the stats and firing counts come down.
 */
export class StepSession {
  private readonly scalars = {
    scale: scalar(),
    lr_step: scalar(),
    sqrt_bc2: scalar(),
    sparsity_coef: scalar(),
    aux_scale: scalar(),
    pre_act_coef: scalar(),
  };
  /** jumprelu_trained's pre-activation loss: 1 on the latents fed as dead this step. */
  private readonly deadMask: ort.Tensor;
  private readonly auxK = new ort.Tensor("int64", new BigInt64Array(1), [1]);
  private readonly k = new ort.Tensor("int64", new BigInt64Array(1), [1]);
  private readonly outputs: StepOutputs;
  private readonly fetchTensors: Record<string, ort.Tensor> = {};

  private constructor(
    private readonly session: StepRunner,
    readonly spec: StepSpec,
    private readonly holder: StateHolder,
    readonly placement: Placement,
  ) {
    const { width: n, dModel: d } = spec;
    this.deadMask = new ort.Tensor("float32", new Float32Array(n), [n]);
    this.outputs = { stats: new Float32Array(STAT_COUNT), fires: new Float32Array(n) };
    this.fetchTensors.stats = new ort.Tensor("float32", this.outputs.stats, [STAT_COUNT]);
    this.fetchTensors.fires = new ort.Tensor("float32", this.outputs.fires, [n]);
    if (spec.gradOutputs) {
      this.outputs.grads = {};
      for (const p of paramsOf(spec.recipe)) {
        const grad = new Float32Array(stateShape(p, n, d).reduce((a, b) => a * b, 1));
        this.outputs.grads[p] = grad;
        this.fetchTensors[`grad_${p}`] = new ort.Tensor("float32", grad, stateShape(p, n, d));
      }
    }
  }

  /**
   * Builds the step graph for `spec` and opens a session on it on `placement` (the CPU unless
   * given); `state` becomes the current state, moved to the device where the state stays there.
   * A provider that cannot load fails naming trainer.executionProvider.
   */
  static async create(spec: StepSpec, state: SaeState, threads: number, placement: Placement = onCpu(threads)): Promise<StepSession> {
    const place = { ...placement, threads };
    // onnxruntime's CPU scatter-add loses adds to a repeated row when it runs on several threads.
    const stages = place.provider === "cpu" && threads !== 1 ? buildStepStages(spec) : undefined;
    if (stages) return new StepSession(await StagedRunner.open(stages, place), spec, new HostStateHolder(spec, state), place);
    const graph = buildStepGraph(spec);
    if (!keepsState(place)) {
      const session = await openOrtSession(graph, ortSessionOptions(place), place.provider, PROVIDER_KEY);
      return new StepSession(session, spec, new HostStateHolder(spec, state), place);
    }
    const outputs = Object.fromEntries(stateOf(spec.recipe).map((s) => [nextName(s), "gpu-buffer" as const]));
    const session = await openOrtSession(graph, ortDeviceSessionOptions(place, outputs), place.provider, PROVIDER_KEY);
    try {
      return new StepSession(session, spec, await DeviceStateHolder.open(spec, state, place), place);
    } catch (err) {
      await session.release();
      throw err;
    }
  }

  /** The current state, where it is on the host (CPU, CUDA, or just read back); readState() reads it on every provider. */
  get state(): SaeState {
    const s = this.holder.hostState;
    if (!s) throw new Error(`the state of this ${this.placement.provider} step is on the device: read it with readState()`);
    return s;
  }

  /** The current state on the host, read back from the device where it is held there. */
  readState(): Promise<SaeState> {
    return this.holder.read();
  }

  /** Where each state tensor is ("cpu" or "gpu-buffer"). */
  stateLocations(): Record<StateName, ort.Tensor.DataLocation> {
    return this.holder.locations();
  }

  /**
   * One step on batch `x` ([B, d] float32 or float16, or [B, d/2] uint32 bf16 word pairs, as the
   * spec says). `deadIdx` lists dead latents for AuxK, and for jumprelu_trained's pre-activation
   * loss as a mask; with none, AuxK is fed one id and a zero weight so the graph keeps its shape. A
   * graph built with a fixed k refuses another k.
   */
  async run(x: ort.Tensor, sc: StepScalars): Promise<StepOutputs> {
    const feeds = { ...this.feeds(x, sc), ...this.holder.inputs() };
    const next = this.holder.fetches();
    if (Object.values(next).some((t) => t === null)) {
      // Bound to the device, onnxruntime-node 1.30 leaves preallocated host outputs unwritten: they come back new and are copied.
      const out = await this.session.run(feeds, { ...Object.fromEntries(Object.keys(this.fetchTensors).map((k) => [k, null])), ...next });
      for (const [name, t] of Object.entries(this.fetchTensors)) (t.data as Float32Array).set(out[name]!.data as Float32Array);
      this.holder.advance(out);
    } else {
      this.holder.advance(await this.session.run(feeds, { ...this.fetchTensors, ...next }));
    }
    return this.outputs;
  }

  private feeds(x: ort.Tensor, sc: StepScalars): Record<string, ort.Tensor> {
    const { beta1, beta2, recipe } = this.spec;
    const { penalised, ranked, thresholded } = STEP_RECIPES[recipe];
    this.scalars.scale.data[0] = sc.scale;
    this.scalars.lr_step.data[0] = sc.lr / (1 - beta1 ** sc.t);
    this.scalars.sqrt_bc2.data[0] = Math.sqrt(1 - beta2 ** sc.t);
    const feeds: Record<string, ort.Tensor> = {
      x,
      scale: this.scalars.scale,
      lr_step: this.scalars.lr_step,
      sqrt_bc2: this.scalars.sqrt_bc2,
    };
    if (penalised || thresholded) {
      this.scalars.sparsity_coef.data[0] = sc.sparsityCoef;
      feeds.sparsity_coef = this.scalars.sparsity_coef;
    }
    if (thresholded && this.spec.jumpRelu?.preActLoss) {
      const mask = this.deadMask.data as Float32Array;
      mask.fill(0);
      for (const i of sc.deadIdx) mask[i] = 1;
      this.scalars.pre_act_coef.data[0] = sc.preActCoef;
      feeds.pre_act_coef = this.scalars.pre_act_coef;
      feeds.dead_mask = this.deadMask;
    }
    if (ranked) {
      if (this.spec.annealK) {
        if (!(sc.k >= 1 && sc.k <= this.spec.k)) throw new Error(`k ${sc.k} is outside this step graph's range 1..${this.spec.k}`);
        this.k.data[0] = BigInt(sc.k);
        feeds.k = this.k;
      } else if (sc.k !== this.spec.k) {
        throw new Error(`k ${sc.k} fed to a step graph built for k ${this.spec.k}`);
      }
    }
    if (ranked && this.spec.auxK) {
      const live = sc.deadIdx.length > 0 && sc.auxScale > 0;
      const ids = live ? BigInt64Array.from(sc.deadIdx, (i) => BigInt(i)) : new BigInt64Array(1);
      feeds.dead_idx = new ort.Tensor("int64", ids, [ids.length]);
      this.auxK.data[0] = BigInt(live ? Math.min(sc.auxK, ids.length) : 1);
      feeds.aux_k = this.auxK;
      this.scalars.aux_scale.data[0] = live ? sc.auxScale : 0;
      feeds.aux_scale = this.scalars.aux_scale;
    }
    return feeds;
  }

  /** Lets go of the onnxruntime session and of any device state; a state read before stays readable. */
  async close(): Promise<void> {
    await this.holder.close();
    await this.session.release();
  }
}
