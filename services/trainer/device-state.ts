import type ort from "onnxruntime-node";
import { ConfigError } from "../common/config/index.js";
import { nextName, type StateName, stateOf, type StepSpec } from "./graph/step.js";
import { formatBytes, stateBytes } from "./memory.js";
import { type Placement, PROVIDER_KEY } from "./placement.js";
import { allocState, type SaeState } from "./sae.js";
import type { StateHolder } from "./session.js";
import { type DeviceState, StateTransfer } from "./transfer.js";

/**
 * The state on the device: each step takes the current tensors as inputs and leaves the next ones
 * there as outputs, and the inputs are then let go. The host sees it only through read(), which
 * reads it back into buffers kept for that, and only when a step moved it since the last read.
 */
export class DeviceStateHolder implements StateHolder {
  private host: SaeState | undefined;
  private fresh = false;

  private constructor(
    private readonly spec: StepSpec,
    private readonly transfer: StateTransfer,
    private current: DeviceState,
  ) {}

  /** Moves `state` to the device; one too small for it fails naming trainer.executionProvider, with what it needs. */
  static async open(spec: StepSpec, state: SaeState, placement: Placement): Promise<DeviceStateHolder> {
    const transfer = await StateTransfer.open(spec.recipe, spec.width, spec.dModel, placement);
    try {
      const holder = new DeviceStateHolder(spec, transfer, await transfer.upload(state));
      holder.host = state;
      holder.fresh = true;
      return holder;
    } catch (err) {
      await transfer.close();
      if (err instanceof ConfigError) throw err;
      const need = formatBytes(stateBytes(spec.recipe, spec.width, spec.dModel));
      throw ConfigError.at(
        PROVIDER_KEY,
        `${placement.provider} could not hold an SAE state of ${need} (width ${spec.width} x dModel ${spec.dModel}, weights and Adam moments): ${(err as Error).message.split("\n")[0]}`,
      );
    }
  }

  inputs = (): Record<string, ort.Tensor> => ({ ...this.current });

  fetches(): Record<string, null> {
    return Object.fromEntries(stateOf(this.spec.recipe).map((s) => [nextName(s), null]));
  }

  advance(out: ort.InferenceSession.OnnxValueMapType): void {
    const before = this.current;
    this.current = Object.fromEntries(stateOf(this.spec.recipe).map((s) => [s, out[nextName(s)] as ort.Tensor])) as DeviceState;
    for (const t of Object.values(before)) t.dispose();
    this.fresh = false;
  }

  async read(): Promise<SaeState> {
    if (!this.fresh || !this.host) {
      this.host ??= allocState(this.spec.width, this.spec.dModel, this.spec.recipe);
      await this.transfer.download(this.current, this.host);
      this.fresh = true;
    }
    return this.host;
  }

  get hostState(): SaeState | undefined {
    return this.fresh ? this.host : undefined;
  }

  locations(): Record<StateName, ort.Tensor.DataLocation> {
    return Object.fromEntries(Object.entries(this.current).map(([s, t]) => [s, t.location])) as Record<StateName, ort.Tensor.DataLocation>;
  }

  async close(): Promise<void> {
    for (const t of Object.values(this.current)) t.dispose();
    await this.transfer.close();
  }
}
