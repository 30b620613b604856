import { type DecoderParams, FAMILIES } from "./families.js";
import { normalSampler } from "./prng.js";

/**
 * Seeded weights of a generated decoder in one canonical layout, whatever the family: Linear
 * weights [out, in] row-major with separate q, k, v. The graph builder lays them out as the family
 * stores them (GPT-2's Conv1D [in, out] with q|k|v blocks, GPT-NeoX's per-head q,k,v rows); the
 * reference forward reads them as they are.
 */

export interface Linear {
  /** [out, in] */
  weight: Float32Array;
  bias?: Float32Array;
  out: number;
  in: number;
}

export interface Norm {
  /** The stored weight; Gemma's RMSNorm multiplies by 1 + weight. */
  weight: Float32Array;
  bias?: Float32Array;
}

export interface DecoderLayerWeights {
  attnNorm: Norm;
  attnPostNorm?: Norm;
  q: Linear;
  k: Linear;
  v: Linear;
  o: Linear;
  mlpNorm: Norm;
  mlpPostNorm?: Norm;
  gate?: Linear;
  up: Linear;
  down: Linear;
}

export interface DecoderWeights {
  /** [vocab, d] */
  embed: Float32Array;
  /** [maxPositions, d], GPT-2's learned positions. */
  positions?: Float32Array;
  layers: DecoderLayerWeights[];
  finalNorm: Norm;
  /** [vocab, d]; the embedding itself when the family ties them. */
  head: Float32Array;
}

/**
 * Normal draws (std 0.02 as transformers' init) with four departures that make the tests see
 * more: biases and norm weights are drawn too (a test then tells a bias or norm weight from none),
 * q and k are drawn at 0.1 so attention is peaked rather than uniform (masks, windows, scales and
 * softcaps then change the outputs visibly), and the embedding and head are drawn at 1/sqrt(d) so
 * logits depend on the residual stream.
 */
export function makeDecoderWeights(p: DecoderParams): DecoderWeights {
  const spec = FAMILIES[p.family];
  const normal = normalSampler(p.seed);
  const d = p.dModel;
  const std = 0.02;
  const linear = (out: number, inDim: number, bias: boolean, scale = std): Linear => ({
    weight: normal(out * inDim, scale),
    ...(bias ? { bias: normal(out, std) } : {}),
    out,
    in: inDim,
  });
  // Gemma stores w for a scale of 1 + w, so its weights are drawn around 0, the others' around 1.
  const norm = (): Norm => ({
    weight: normal(d, std, spec.norm === "rms_one_plus" ? 0 : 1),
    ...(spec.norm === "layer" ? { bias: normal(d, std) } : {}),
  });
  const embed = normal(p.vocabSize * d, 1 / Math.sqrt(d));
  const positions = spec.paths.positions ? normal(p.maxPositions * d, std) : undefined;
  const layers = Array.from({ length: p.layers }, (): DecoderLayerWeights => {
    const attnNorm = norm();
    const q = linear(p.heads * p.headDim, d, spec.qkvBias, 0.1);
    const k = linear(p.kvHeads * p.headDim, d, spec.qkvBias, 0.1);
    const v = linear(p.kvHeads * p.headDim, d, spec.qkvBias);
    const o = linear(d, p.heads * p.headDim, spec.oBias);
    const attnPostNorm = spec.paths.attnPostNorm ? norm() : undefined;
    const mlpNorm = norm();
    const gated = spec.mlp === "silu_gated" || spec.mlp === "gelu_tanh_gated";
    const gate = gated ? linear(p.ffn, d, spec.mlpBias) : undefined;
    const up = linear(p.ffn, d, spec.mlpBias);
    const down = linear(d, p.ffn, spec.mlpBias);
    const mlpPostNorm = spec.paths.mlpPostNorm ? norm() : undefined;
    return { attnNorm, attnPostNorm, q, k, v, o, mlpNorm, mlpPostNorm, gate, up, down };
  });
  const finalNorm = norm();
  const head = spec.tiedEmbeddings ? embed : normal(p.vocabSize * d, 1 / Math.sqrt(d));
  return { embed, positions, layers, finalNorm, head };
}
