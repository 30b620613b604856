import { F16, F32, GraphBuilder } from "./builder.js";

export interface CalibrateSpec {
  batchSize: number;
  dModel: number;
  width: number;
  k: number;
  input: "fp32" | "fp16";
}

/**
 * Llama Scope's TopK-to-JumpReLU calibration on one batch: the (B*k)-th largest of
 * relu(pre) * |W_dec_i| over the whole batch, the one threshold that keeps an average of k latents
 * per token. Inputs x [B, d], scale [], W_enc [n, d], b_enc [n], b_dec [d], dec_norm [n]; output
 * threshold [].
 */
export function buildCalibrateGraph(spec: CalibrateSpec): Uint8Array {
  const { batchSize: B, dModel: d, width: n, k } = spec;
  const g = new GraphBuilder("jumprelu_calibrate");
  const xIn = g.input("x", spec.input === "fp16" ? F16 : F32, [B, d]);
  const scale = g.input("scale", F32, []);
  const wEnc = g.input("W_enc", F32, [n, d]);
  const bEnc = g.input("b_enc", F32, [n]);
  const bDec = g.input("b_dec", F32, [d]);
  const decNorm = g.input("dec_norm", F32, [n]);
  const x = spec.input === "fp16" ? g.cast(xIn, F32) : xIn; // [B, d]
  const xCent = g.sub(g.mul(x, scale), bDec, "x_cent"); // [B, d]
  const pre = g.gemm(xCent, wEnc, { bias: bEnc, transB: true }, "pre"); // [B, n]
  const score = g.reshape(g.mul(g.relu(pre), decNorm), [B * n], "score"); // [B*n]
  const [top] = g.opN("TopK", [score, g.constI([B * k])], 2, { axis: 0, largest: 1, sorted: 0 }, "top"); // [B*k]
  g.output(g.op("ReduceMin", [top!], { keepdims: 0 }, "threshold"), "threshold", F32, []);
  return g.build();
}
