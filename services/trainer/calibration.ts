import { RECIPES } from "../common/config/recipes.js";
import type { SaeSpec } from "../common/config/sections/trainer.js";
import { type Batch, batchTensor } from "./batches.js";
import { jumpReluThresholds } from "./jumprelu.js";
import type { HookConfig } from "./hook.js";
import type { Placement } from "./placement.js";
import type { SaeState } from "./sae.js";

/**
 * The most recent batches, as many as JumpReLU's conversion calibrates on, kept while training when
 * an SAE of the sweep will need them at export; and that conversion, which tops the kept batches up
 * from the source when too few were seen (an export without training holds none).
 */
export class CalibrationCache {
  private readonly batches: Batch[] = [];
  private readonly want: number;
  private readonly needed: boolean;

  constructor(
    private readonly cfg: HookConfig,
    private readonly placement: Placement,
  ) {
    this.want = Math.ceil(cfg.jumprelu.calibrationTokens / cfg.batchSize);
    this.needed = cfg.saes.some((s) => RECIPES[s.recipe].calibrates);
  }

  /** Keeps the step's batch when an SAE will calibrate; each batch owns its rows, so they are kept as they came. */
  keep(batch: Batch): void {
    if (!this.needed) return;
    this.batches.push(batch);
    if (this.batches.length > this.want) this.batches.shift();
  }

  /**
   * The SAE's per-latent thresholds, after drawing batches from `next` (undefined: no more) until
   * enough are held; computed on the trainer's provider, bf16 rows widened to float32 for it.
   */
  async thresholds(sae: SaeSpec, state: SaeState, scale: number, next: () => Promise<Batch | undefined>): Promise<Float32Array> {
    while (this.batches.length < this.want) {
      const batch = await next();
      if (!batch) break;
      this.keep(batch);
    }
    if (this.batches.length === 0) throw new Error(`${sae.name}: the JumpReLU conversion needs calibration batches and none were seen`);
    const spec = { batchSize: this.cfg.batchSize, dModel: this.cfg.dModel, width: sae.width, k: sae.k };
    const xs = this.batches.map((b) => batchTensor(b));
    return jumpReluThresholds(spec, state, scale, xs, this.placement);
  }
}
