import ort from "onnxruntime-node";
import { openOrtSession, ortSessionOptions } from "../common/ort.js";
import { buildCalibrateGraph, type CalibrateSpec } from "./graph/calibrate.js";
import { type Placement, PROVIDER_KEY } from "./placement.js";
import { decoderNorms, type SaeState } from "./sae.js";

/** The calibration graph over one SAE's weights: the batch threshold theta of one batch at a time. */
class CalibrateSession {
  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly weights: Record<string, ort.Tensor>,
  ) {}

  static async open(
    spec: CalibrateSpec,
    state: SaeState,
    decNorm: Float32Array,
    scale: number,
    placement: Placement,
  ): Promise<CalibrateSession> {
    const { width: n, dModel: d } = spec;
    const session = await openOrtSession(buildCalibrateGraph(spec), ortSessionOptions(placement), placement.provider, PROVIDER_KEY);
    return new CalibrateSession(session, {
      scale: new ort.Tensor("float32", Float32Array.of(scale), []),
      W_enc: new ort.Tensor("float32", state.W_enc, [n, d]),
      b_enc: new ort.Tensor("float32", state.b_enc, [n]),
      b_dec: new ort.Tensor("float32", state.b_dec, [d]),
      dec_norm: new ort.Tensor("float32", decNorm, [n]),
    });
  }

  async theta(x: ort.Tensor): Promise<number> {
    const out = await this.session.run({ ...this.weights, x });
    return (out.threshold!.data as Float32Array)[0]!;
  }

  async close(): Promise<void> {
    await this.session.release();
  }
}

/**
 * Llama Scope's conversion of a trained TopK SAE to JumpReLU: on calibration batches, the threshold
 * theta is the (B*k)-th largest relu(pre_i) * |W_dec_i| of each batch (averaged over batches), and
 * latent i's threshold is theta / |W_dec_i|. The JumpReLU then keeps k latents per token on average,
 * without TopK's dependence of one latent on the others. The graph takes the batches as they are
 * held, float16 or float32, so their element type decides its input. It runs where the step runs
 * (`placement`), on weights read back from it.
 */
export async function jumpReluThresholds(
  spec: Omit<CalibrateSpec, "input">,
  state: SaeState,
  scale: number,
  batches: readonly ort.Tensor[],
  placement: Placement,
): Promise<Float32Array> {
  if (batches.length === 0) throw new Error("JumpReLU calibration needs at least one batch");
  const type = batches[0]!.type;
  if (type !== "float16" && type !== "float32") throw new Error(`JumpReLU calibration takes float16 or float32 batches, not ${type}`);
  if (batches.some((x) => x.type !== type)) throw new Error("JumpReLU calibration batches mix float16 and float32");
  const decNorm = decoderNorms(state, spec.width, spec.dModel);
  const session = await CalibrateSession.open({ ...spec, input: type === "float16" ? "fp16" : "fp32" }, state, decNorm, scale, placement);
  try {
    let sum = 0;
    for (const x of batches) sum += await session.theta(x);
    const theta = sum / batches.length;
    return Float32Array.from(decNorm, (norm) => theta / Math.max(norm, 1e-12));
  } finally {
    await session.close();
  }
}
