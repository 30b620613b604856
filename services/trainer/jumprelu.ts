import ort from "onnxruntime-node";
import { buildCalibrateGraph, type CalibrateSpec } from "./graph/calibrate.js";
import { decoderNorms, type SaeState } from "./sae.js";
import { sessionOptions } from "./session.js";

/**
 * Llama Scope's conversion of a trained TopK SAE to JumpReLU: on calibration batches, the threshold
 * theta is the (B*k)-th largest relu(pre_i) * |W_dec_i| of each batch (averaged over batches), and
 * latent i's threshold is theta / |W_dec_i|. The JumpReLU then keeps k latents per token on average,
 * without TopK's dependence of one latent on the others.
 */
export async function jumpReluThresholds(
  spec: CalibrateSpec,
  state: SaeState,
  scale: number,
  batches: readonly ort.Tensor[],
  threads: number,
): Promise<Float32Array> {
  if (batches.length === 0) throw new Error("JumpReLU calibration needs at least one batch");
  const { width: n, dModel: d } = spec;
  const decNorm = decoderNorms(state, n, d);
  const session = await ort.InferenceSession.create(buildCalibrateGraph(spec), sessionOptions(threads));
  try {
    const feeds = {
      scale: new ort.Tensor("float32", Float32Array.of(scale), []),
      W_enc: new ort.Tensor("float32", state.W_enc, [n, d]),
      b_enc: new ort.Tensor("float32", state.b_enc, [n]),
      b_dec: new ort.Tensor("float32", state.b_dec, [d]),
      dec_norm: new ort.Tensor("float32", decNorm, [n]),
    };
    let sum = 0;
    for (const x of batches) {
      const out = await session.run({ ...feeds, x });
      sum += (out.threshold!.data as Float32Array)[0]!;
    }
    const theta = sum / batches.length;
    return Float32Array.from(decNorm, (norm) => theta / Math.max(norm, 1e-12));
  } finally {
    await session.release();
  }
}
