import ort from "onnxruntime-node";
import { type OutputLocation, openOrtSession, ortDeviceSessionOptions } from "../common/ort.js";
import { type StateName, stateOf, stateShape, type StepRecipe } from "./graph/step.js";
import { buildCopyGraph, copyName } from "./graph/transfer.js";
import { type Placement, PROVIDER_KEY } from "./placement.js";
import { type SaeState, stateTensor } from "./sae.js";

/** An SAE state held on a device: one onnxruntime tensor per state tensor. */
export type DeviceState = Record<StateName, ort.Tensor>;

/**
 * Moves one SAE's whole state between the host and the device of `placement`, one session run each
 * way: up when training starts or resumes, down at checkpoints and exports. Nothing else moves it.
 */
export class StateTransfer {
  private constructor(
    private readonly up: ort.InferenceSession,
    private readonly down: ort.InferenceSession,
    private readonly recipe: StepRecipe,
    private readonly n: number,
    private readonly d: number,
  ) {}

  static async open(recipe: StepRecipe, n: number, d: number, placement: Placement): Promise<StateTransfer> {
    const graph = buildCopyGraph(recipe, n, d);
    const at = (location: OutputLocation) => Object.fromEntries(stateOf(recipe).map((s) => [copyName(s), location]));
    const open = (location: OutputLocation) =>
      openOrtSession(graph, ortDeviceSessionOptions(placement, at(location)), placement.provider, PROVIDER_KEY);
    const up = await open("gpu-buffer");
    try {
      return new StateTransfer(up, await open("cpu"), recipe, n, d);
    } catch (err) {
      await up.release();
      throw err;
    }
  }

  private host(state: SaeState): Record<string, ort.Tensor> {
    return Object.fromEntries(
      stateOf(this.recipe).map((s) => [s, new ort.Tensor("float32", stateTensor(state, s), stateShape(s, this.n, this.d))]),
    );
  }

  /** The state on the device; the host copy stays the caller's. */
  async upload(state: SaeState): Promise<DeviceState> {
    const out = await this.up.run(this.host(state));
    return Object.fromEntries(stateOf(this.recipe).map((s) => [s, out[copyName(s)]!])) as DeviceState;
  }

  /** Reads the device state into `into`'s buffers, and returns them. */
  async download(state: DeviceState, into: SaeState): Promise<SaeState> {
    const fetches = Object.fromEntries(Object.entries(this.host(into)).map(([s, t]) => [copyName(s as StateName), t]));
    await this.down.run(state, fetches);
    return into;
  }

  async close(): Promise<void> {
    await this.up.release();
    await this.down.release();
  }
}
