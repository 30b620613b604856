import { headDim, type LlamaParams, type LlamaWeights, ropeInvFreq } from "./llama.js";

/**
 * Llama's forward pass written out plainly (transformers' modeling_llama, eager attention), to
 * check the ONNX graph against. Slow and for short inputs only. Sums run in float64, so results
 * agree with onnxruntime to rounding, not bit for bit.
 */

/** y[s, o] = sum_i x[s, i] * w[o, i] for w in [out, in] layout (a Linear without bias). */
function linear(x: Float32Array, rows: number, w: Float32Array, outDim: number, inDim: number): Float32Array {
  const y = new Float32Array(rows * outDim);
  for (let s = 0; s < rows; s++) {
    for (let o = 0; o < outDim; o++) {
      let acc = 0;
      for (let i = 0; i < inDim; i++) acc += x[s * inDim + i]! * w[o * inDim + i]!;
      y[s * outDim + o] = acc;
    }
  }
  return y;
}

function rmsNorm(x: Float32Array, rows: number, d: number, weight: Float32Array, eps: number): Float32Array {
  const y = new Float32Array(x.length);
  for (let s = 0; s < rows; s++) {
    let sq = 0;
    for (let i = 0; i < d; i++) sq += x[s * d + i]! ** 2;
    const r = 1 / Math.sqrt(sq / d + eps);
    for (let i = 0; i < d; i++) y[s * d + i] = weight[i]! * (x[s * d + i]! * r);
  }
  return y;
}

const add = (a: Float32Array, b: Float32Array): Float32Array => a.map((v, i) => v + b[i]!);

export interface ReferenceInput {
  ids: number[];
  /** 1 for tokens, 0 for padding; all ones when absent. */
  mask?: number[];
  /** Rotary positions; 0..n-1 when absent. */
  positions?: number[];
}

export interface ReferenceOutput {
  /** [seq, vocab] */
  logits: Float32Array;
  /** [seq, d_model] at every hook point, keyed by hook name (blocks.L.hook_resid_pre, ...). */
  hooks: Map<string, Float32Array>;
}

/** The forward pass for one sequence. */
export function referenceForward(p: LlamaParams, w: LlamaWeights, input: ReferenceInput): ReferenceOutput {
  const n = input.ids.length;
  const mask = input.mask ?? input.ids.map(() => 1);
  const positions = input.positions ?? input.ids.map((_, i) => i);
  const d = p.dModel;
  const hd = headDim(p);
  const groups = p.heads / p.kvHeads;
  const invFreq = ropeInvFreq(p);

  // cos/sin [seq, hd] as cat(freqs, freqs), angles rounded to float32 as the graph computes them.
  const cos = new Float64Array(n * hd);
  const sin = new Float64Array(n * hd);
  for (let s = 0; s < n; s++) {
    for (let i = 0; i < hd; i++) {
      const angle = Math.fround(positions[s]! * invFreq[i % (hd / 2)]!);
      cos[s * hd + i] = Math.cos(angle);
      sin[s * hd + i] = Math.sin(angle);
    }
  }
  // In place on x [seq, heads*hd]: x*cos + rotate_half(x)*sin per head.
  const rope = (x: Float32Array, heads: number) => {
    const half = hd / 2;
    for (let s = 0; s < n; s++) {
      for (let h = 0; h < heads; h++) {
        const at = s * heads * hd + h * hd;
        const v = x.slice(at, at + hd);
        for (let i = 0; i < hd; i++) {
          const rotated = i < half ? -v[i + half]! : v[i - half]!;
          x[at + i] = v[i]! * cos[s * hd + i]! + rotated * sin[s * hd + i]!;
        }
      }
    }
  };

  let h: Float32Array = new Float32Array(n * d);
  input.ids.forEach((id, s) => h.set(w.embed.subarray(id * d, (id + 1) * d), s * d));

  const hooks = new Map<string, Float32Array>();
  w.layers.forEach((lw, l) => {
    hooks.set(`blocks.${l}.hook_resid_pre`, h);
    const x = rmsNorm(h, n, d, lw.inputNorm, p.rmsEps);
    const q = linear(x, n, lw.q, p.heads * hd, d);
    const k = linear(x, n, lw.k, p.kvHeads * hd, d);
    const v = linear(x, n, lw.v, p.kvHeads * hd, d);
    rope(q, p.heads);
    rope(k, p.kvHeads);
    const merged = new Float32Array(n * p.heads * hd);
    for (let head = 0; head < p.heads; head++) {
      const kv = Math.floor(head / groups);
      for (let s = 0; s < n; s++) {
        // Masked scores become float32's lowest value, as in transformers; a row with every key
        // masked (a padding query) then softmaxes to uniform over all keys.
        const scores = Array.from({ length: n }, (_, t) => {
          if (t > s || mask[t] === 0) return -3.4028234663852886e38;
          let dot = 0;
          for (let i = 0; i < hd; i++) dot += q[s * p.heads * hd + head * hd + i]! * k[t * p.kvHeads * hd + kv * hd + i]!;
          return dot / Math.sqrt(hd);
        });
        const max = Math.max(...scores);
        const e = scores.map((v) => Math.exp(v - max));
        const total = e.reduce((x, y) => x + y, 0);
        for (let i = 0; i < hd; i++) {
          let acc = 0;
          for (let t = 0; t < n; t++) acc += (e[t]! / total) * v[t * p.kvHeads * hd + kv * hd + i]!;
          merged[s * p.heads * hd + head * hd + i] = acc;
        }
      }
    }
    const attnOut = linear(merged, n, lw.o, d, p.heads * hd);
    const mid = add(h, attnOut);
    const y = rmsNorm(mid, n, d, lw.postNorm, p.rmsEps);
    const gate = linear(y, n, lw.gate, p.ffn, d);
    const up = linear(y, n, lw.up, p.ffn, d);
    const act = gate.map((g, i) => (g / (1 + Math.exp(-g))) * up[i]!);
    const mlpOut = linear(act, n, lw.down, d, p.ffn);
    h = add(mid, mlpOut);
    hooks.set(`blocks.${l}.hook_attn_out`, attnOut);
    hooks.set(`blocks.${l}.hook_resid_mid`, mid);
    hooks.set(`blocks.${l}.hook_mlp_out`, mlpOut);
    hooks.set(`blocks.${l}.hook_resid_post`, h);
  });
  return { logits: linear(rmsNorm(h, n, d, w.norm, p.rmsEps), n, w.lmHead, p.vocabSize, d), hooks };
}
