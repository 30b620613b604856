import type { DecoderLayerWeights, DecoderWeights, Linear, Norm } from "./decoder-weights.js";
import { attnScale, type DecoderParams, FAMILIES, invFreq, type MlpKind, rotaryDims, slides } from "./families.js";
import type { ReferenceInput, ReferenceOutput } from "./reference.js";

/**
 * The forward pass of every generated family written out plainly, after transformers'
 * modeling_gpt2 / modeling_gpt_neox / modeling_gemma2 / modeling_qwen2 / modeling_mistral (eager
 * attention), to check the ONNX graphs against. Sums run in float64 and activations are stored in
 * float32, so results agree with onnxruntime to rounding, not bit for bit. Hook tensors are what
 * TransformerLens names them: attn_out and mlp_out are what each sublayer adds to the residual
 * stream (for Gemma 2 after its post-norm), and a parallel GPT-NeoX layer has no resid_mid.
 */

/** torch.finfo(float32).min: what transformers puts at masked attention scores. */
const MASKED = -3.4028234663852886e38;

function linear(x: Float32Array, rows: number, w: Linear): Float32Array {
  const y = new Float32Array(rows * w.out);
  for (let s = 0; s < rows; s++) {
    for (let o = 0; o < w.out; o++) {
      let acc = w.bias?.[o] ?? 0;
      for (let i = 0; i < w.in; i++) acc += x[s * w.in + i]! * w.weight[o * w.in + i]!;
      y[s * w.out + o] = acc;
    }
  }
  return y;
}

function norm(p: DecoderParams, x: Float32Array, rows: number, n: Norm): Float32Array {
  const d = p.dModel;
  const kind = FAMILIES[p.family].norm;
  const y = new Float32Array(x.length);
  for (let s = 0; s < rows; s++) {
    const row = x.subarray(s * d, (s + 1) * d);
    const mean = kind === "layer" ? row.reduce((a, v) => a + v, 0) / d : 0;
    const variance = row.reduce((a, v) => a + (v - mean) ** 2, 0) / d;
    const r = 1 / Math.sqrt(variance + p.eps);
    for (let i = 0; i < d; i++) {
      // Gemma computes 1 + w in float32 before scaling.
      const scale = kind === "rms_one_plus" ? Math.fround(1 + n.weight[i]!) : n.weight[i]!;
      y[s * d + i] = (row[i]! - mean) * r * scale + (n.bias?.[i] ?? 0);
    }
  }
  return y;
}

/** erf to float64 precision: its Taylor series below 3, a continued fraction for erfc above. */
export function erf(x: number): number {
  const a = Math.abs(x);
  if (a < 3) {
    let term = a;
    let sum = a;
    for (let n = 1; Math.abs(term) > 1e-17 * Math.abs(sum); n++) {
      term *= (-a * a) / n;
      sum += term / (2 * n + 1);
    }
    return Math.sign(x) * (2 / Math.sqrt(Math.PI)) * sum;
  }
  let f = 0;
  for (let n = 60; n >= 1; n--) f = n / 2 / (a + f);
  const erfc = Math.exp(-a * a) / Math.sqrt(Math.PI) / (a + f);
  return Math.sign(x) * (1 - erfc);
}

const geluTanh = (x: number) => 0.5 * x * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (x + 0.044715 * x ** 3)));
const ACTIVATIONS: Record<MlpKind, (x: number) => number> = {
  gelu_new: geluTanh,
  gelu_tanh_gated: geluTanh,
  gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
  silu_gated: (x) => x / (1 + Math.exp(-x)),
};

function mlp(p: DecoderParams, x: Float32Array, rows: number, lw: DecoderLayerWeights): Float32Array {
  const act = ACTIVATIONS[FAMILIES[p.family].mlp];
  const up = linear(x, rows, lw.up);
  const hidden = lw.gate ? linear(x, rows, lw.gate).map((g, i) => act(g) * up[i]!) : up.map(act);
  return linear(hidden, rows, lw.down);
}

/** cos/sin [seq, rotaryDims] as cat(freqs, freqs), angles rounded to float32 as the graphs compute them. */
function rotaryTables(p: DecoderParams, positions: number[]) {
  const dims = rotaryDims(p);
  const freq = invFreq(p);
  const cos = new Float64Array(positions.length * dims);
  const sin = new Float64Array(positions.length * dims);
  positions.forEach((pos, s) => {
    for (let i = 0; i < dims; i++) {
      const angle = Math.fround(pos * freq[i % (dims / 2)]!);
      cos[s * dims + i] = Math.cos(angle);
      sin[s * dims + i] = Math.sin(angle);
    }
  });
  return { cos, sin, dims };
}

/** In place on x [seq, heads*hd]: the first `dims` of each head become x*cos + rotate_half(x)*sin. */
function rope(x: Float32Array, heads: number, hd: number, t: ReturnType<typeof rotaryTables>): void {
  const half = t.dims / 2;
  const n = x.length / (heads * hd);
  for (let s = 0; s < n; s++) {
    for (let h = 0; h < heads; h++) {
      const at = s * heads * hd + h * hd;
      const v = x.slice(at, at + t.dims);
      for (let i = 0; i < t.dims; i++) {
        const rotated = i < half ? -v[i + half]! : v[i - half]!;
        x[at + i] = v[i]! * t.cos[s * t.dims + i]! + rotated * t.sin[s * t.dims + i]!;
      }
    }
  }
}

interface Context {
  n: number;
  mask: number[];
  tables: ReturnType<typeof rotaryTables> | undefined;
}

function attention(p: DecoderParams, x: Float32Array, lw: DecoderLayerWeights, l: number, ctx: Context): Float32Array {
  const { n, mask } = ctx;
  const hd = p.headDim;
  const q = linear(x, n, lw.q);
  const k = linear(x, n, lw.k);
  const v = linear(x, n, lw.v);
  if (ctx.tables) {
    rope(q, p.heads, hd, ctx.tables);
    rope(k, p.kvHeads, hd, ctx.tables);
  }
  const window = slides(p, l) ? p.slidingWindow : Infinity;
  const groups = p.heads / p.kvHeads;
  const merged = new Float32Array(n * p.heads * hd);
  for (let head = 0; head < p.heads; head++) {
    const kv = Math.floor(head / groups);
    for (let s = 0; s < n; s++) {
      // A masked score is float32's lowest value, as in transformers: a query that sees no key
      // (a padding query) then attends uniformly to all of them.
      const scores = Array.from({ length: n }, (_, t) => {
        if (t > s || t <= s - window || mask[t] === 0) return MASKED;
        let dot = 0;
        for (let i = 0; i < hd; i++) dot += q[s * p.heads * hd + head * hd + i]! * k[t * p.kvHeads * hd + kv * hd + i]!;
        const score = dot * attnScale(p);
        return p.attnSoftcap > 0 ? Math.tanh(score / p.attnSoftcap) * p.attnSoftcap : score;
      });
      const max = Math.max(...scores);
      const e = scores.map((z) => Math.exp(z - max));
      const total = e.reduce((a, b) => a + b, 0);
      for (let i = 0; i < hd; i++) {
        let acc = 0;
        for (let t = 0; t < n; t++) acc += (e[t]! / total) * v[t * p.kvHeads * hd + kv * hd + i]!;
        merged[s * p.heads * hd + head * hd + i] = acc;
      }
    }
  }
  return linear(merged, n, lw.o);
}

const add = (a: Float32Array, b: Float32Array): Float32Array => a.map((v, i) => v + b[i]!);

function embed(p: DecoderParams, w: DecoderWeights, ids: number[], positions: number[]): Float32Array {
  const d = p.dModel;
  const h = new Float32Array(ids.length * d);
  ids.forEach((id, s) => h.set(w.embed.subarray(id * d, (id + 1) * d), s * d));
  if (w.positions)
    return add(
      h,
      Float32Array.from({ length: h.length }, (_, i) => w.positions![positions[Math.floor(i / d)]! * d + (i % d)]!),
    );
  // Gemma multiplies by sqrt(hidden_size) as a tensor of the activations' dtype.
  if (FAMILIES[p.family].embedScale) return h.map((v) => v * Math.fround(Math.sqrt(d)));
  return h;
}

/** The forward pass for one sequence of `p.family`. */
export function referenceDecoder(p: DecoderParams, w: DecoderWeights, input: ReferenceInput): ReferenceOutput {
  const n = input.ids.length;
  const spec = FAMILIES[p.family];
  const positions = input.positions ?? input.ids.map((_, i) => i);
  const ctx: Context = {
    n,
    mask: input.mask ?? input.ids.map(() => 1),
    tables: spec.paths.positions ? undefined : rotaryTables(p, positions),
  };
  let h = embed(p, w, input.ids, positions);
  const hooks = new Map<string, Float32Array>();
  w.layers.forEach((lw, l) => {
    const hook = (kind: string, t: Float32Array) => hooks.set(`blocks.${l}.hook_${kind}`, t);
    hook("resid_pre", h);
    let attnOut = attention(p, norm(p, h, n, lw.attnNorm), lw, l, ctx);
    if (lw.attnPostNorm) attnOut = norm(p, attnOut, n, lw.attnPostNorm);
    hook("attn_out", attnOut);
    if (spec.parallel) {
      const mlpOut = mlp(p, norm(p, h, n, lw.mlpNorm), n, lw);
      hook("mlp_out", mlpOut);
      // mlp_output + attn_output + hidden_states, summed in that order as GPT-NeoX does.
      h = add(add(mlpOut, attnOut), h);
    } else {
      const mid = add(h, attnOut);
      hook("resid_mid", mid);
      let mlpOut = mlp(p, norm(p, mid, n, lw.mlpNorm), n, lw);
      if (lw.mlpPostNorm) mlpOut = norm(p, mlpOut, n, lw.mlpPostNorm);
      hook("mlp_out", mlpOut);
      h = add(mid, mlpOut);
    }
    hook("resid_post", h);
  });
  const head: Linear = { weight: w.head, out: p.vocabSize, in: p.dModel };
  let logits = linear(norm(p, h, n, w.finalNorm), n, head);
  if (p.finalSoftcap > 0) logits = logits.map((z) => Math.tanh(z / p.finalSoftcap) * p.finalSoftcap);
  return { logits, hooks };
}
