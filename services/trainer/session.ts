import ort from "onnxruntime-node";
import { STEP_RECIPES } from "../common/config/recipes.js";
import { ortSessionOptions } from "../common/ort.js";
import { buildStepGraph, nextName, type ParamName, paramsOf, STAT_COUNT, stateOf, stateShape, type StepSpec } from "./graph/step.js";
import type { StepScalars } from "./reference.js";
import { allocState, type SaeState, stateTensor } from "./sae.js";

/** What one step reports besides the new state. Arrays are reused by the next step: copy to keep. */
export interface StepOutputs {
  stats: Float32Array;
  fires: Float32Array;
  /** The gradients Adam was given (after clipping); only when the graph was built with gradOutputs. */
  grads?: Partial<Record<ParamName, Float32Array>>;
}

const scalar = () => new ort.Tensor("float32", new Float32Array(1), []);

/**
 * An onnxruntime session running one SAE's step graph. The state lives in two sets of buffers: the
 * step reads one and writes the other, preallocated, and the two swap, so a step allocates nothing
 * of the state's size.
 */
export class StepSession {
  private cur: SaeState;
  private spare: SaeState;
  private readonly scalars = { scale: scalar(), lr_step: scalar(), sqrt_bc2: scalar(), l1_coef: scalar(), aux_scale: scalar() };
  private readonly auxK = new ort.Tensor("int64", new BigInt64Array(1), [1]);
  private readonly k = new ort.Tensor("int64", new BigInt64Array(1), [1]);
  private readonly outputs: StepOutputs;
  private readonly fetchTensors: Record<string, ort.Tensor> = {};

  private constructor(
    private readonly session: ort.InferenceSession,
    readonly spec: StepSpec,
    state: SaeState,
  ) {
    const { width: n, dModel: d } = spec;
    this.cur = state;
    this.spare = allocState(n, d, spec.recipe);
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

  /** Builds the step graph for `spec` and opens a session on it; `state` becomes the current state. */
  static async create(spec: StepSpec, state: SaeState, threads: number): Promise<StepSession> {
    const session = await ort.InferenceSession.create(buildStepGraph(spec), ortSessionOptions({ threads }));
    return new StepSession(session, spec, state);
  }

  /** The current state (read it between steps; the next step replaces it). */
  get state(): SaeState {
    return this.cur;
  }

  private tensors(state: SaeState): Record<string, ort.Tensor> {
    const { width: n, dModel: d } = this.spec;
    return Object.fromEntries(
      stateOf(this.spec.recipe).map((s) => [s, new ort.Tensor("float32", stateTensor(state, s), stateShape(s, n, d))]),
    );
  }

  /**
   * One step on batch `x` ([B, d], float32 or float16 as the spec says). `deadIdx` lists dead
   * latents for AuxK; with none, AuxK is fed one id and a zero weight so the graph keeps its shape.
   * A graph built with a fixed k refuses another k.
   */
  async run(x: ort.Tensor, sc: StepScalars): Promise<StepOutputs> {
    const { beta1, beta2, recipe } = this.spec;
    const { penalised, ranked } = STEP_RECIPES[recipe];
    this.scalars.scale.data[0] = sc.scale;
    this.scalars.lr_step.data[0] = sc.lr / (1 - beta1 ** sc.t);
    this.scalars.sqrt_bc2.data[0] = Math.sqrt(1 - beta2 ** sc.t);
    const feeds: Record<string, ort.Tensor> = {
      x,
      scale: this.scalars.scale,
      lr_step: this.scalars.lr_step,
      sqrt_bc2: this.scalars.sqrt_bc2,
    };
    if (penalised) {
      this.scalars.l1_coef.data[0] = sc.l1Coef;
      feeds.l1_coef = this.scalars.l1_coef;
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
    Object.assign(feeds, this.tensors(this.cur));
    const next = this.tensors(this.spare);
    const fetches: Record<string, ort.Tensor> = { ...this.fetchTensors };
    for (const s of stateOf(recipe)) fetches[nextName(s)] = next[s]!;
    await this.session.run(feeds, fetches);
    [this.cur, this.spare] = [this.spare, this.cur];
    return this.outputs;
  }

  /** Lets go of the onnxruntime session; the current state stays readable. */
  async close(): Promise<void> {
    await this.session.release();
  }
}
