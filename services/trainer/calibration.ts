import ort from "onnxruntime-node";
import type { TrainerConfig } from "../common/config/index.js";
import { RECIPES } from "../common/config/recipes.js";
import type { SaeSpec } from "../common/config/sections/trainer.js";
import { type Batch, batchTensor } from "./batches.js";
import { jumpReluThresholds } from "./jumprelu.js";
import type { SaeState } from "./sae.js";

/**
 * The most recent batches, as many as JumpReLU's conversion calibrates on, kept while training when
 * an SAE of the sweep will need them at export; and that conversion, which tops the kept batches up
 * from the source when too few were seen (an export without training holds none).
 */
export class CalibrationCache {
  private readonly batches: ort.Tensor[] = [];
  private readonly want: number;
  private readonly needed: boolean;

  constructor(private readonly cfg: TrainerConfig) {
    this.want = Math.ceil(cfg.jumprelu.calibrationTokens / cfg.batchSize);
    this.needed = cfg.saes.some((s) => RECIPES[s.recipe].calibrates);
  }

  /**
   * Keeps the step's input `x`, made from `batch`, when an SAE will calibrate. A bf16 batch was
   * widened into memory the next step reuses, so it is copied.
   */
  keep(batch: Batch, x: ort.Tensor): void {
    if (!this.needed) return;
    this.hold(batch.dtype === "bf16" ? new ort.Tensor("float32", Float32Array.from(x.data as Float32Array), x.dims) : x);
  }

  private hold(x: ort.Tensor): void {
    this.batches.push(x);
    if (this.batches.length > this.want) this.batches.shift();
  }

  /** The SAE's per-latent thresholds, after drawing batches from `next` (undefined: no more) until enough are held. */
  async thresholds(sae: SaeSpec, state: SaeState, scale: number, next: () => Promise<Batch | undefined>): Promise<Float32Array> {
    while (this.batches.length < this.want) {
      const batch = await next();
      if (!batch) break;
      this.hold(batchTensor(batch));
    }
    if (this.batches.length === 0) throw new Error(`${sae.name}: the JumpReLU conversion needs calibration batches and none were seen`);
    const spec = { batchSize: this.cfg.batchSize, dModel: this.cfg.dModel, width: sae.width, k: sae.k };
    return jumpReluThresholds(spec, state, scale, this.batches, this.cfg.threads);
  }
}
