import { DataType } from "../../services/producer/model/onnx.js";
import { attr, GraphBuilder } from "./builder.js";
import type { DecoderLayerWeights, Linear, Norm } from "./decoder-weights.js";
import { attnScale, type DecoderParams, FAMILIES, type FamilySpec, rotaryDims } from "./families.js";

/**
 * The pieces of a family's ONNX graph as torch.onnx exports them: Linear as MatMul on a transposed
 * anonymous initializer ("onnx::MatMul_<n>") plus Add(bias, ·); GPT-2's Conv1D as a Gemm on a 2-D
 * view between Reshapes; LayerNorm as LayerNormalization from opset 17, else torch's
 * decomposition; RMSNorm written out as transformers writes it; GELUs as torch's decompositions
 * (no Gelu op before opset 20). Node names are `/<module path>/<Op>` with module paths from
 * families.ts.
 */

/** [out, in] row-major to [in, out], the layout MatMul(x, W) and Conv1D need. */
export function transpose(w: Float32Array, rows: number, cols: number): Float32Array {
  const t = new Float32Array(w.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = w[r * cols + c]!;
  return t;
}

/** Rotary tables [batch, 1, seq, dims], shared by every layer. */
export interface Tables {
  cos: string;
  sin: string;
}

export class DecoderBlocks {
  readonly g = new GraphBuilder();
  readonly spec: FamilySpec;
  private anonymous = 0;

  constructor(readonly p: DecoderParams) {
    this.spec = FAMILIES[p.family];
  }

  /** The node-name scope of a module path: "transformer/h.0/attn" -> "/transformer/h.0/attn". */
  scope(path: string): string {
    return path === "" ? "" : `/${path}`;
  }

  /** A parameter's state-dict name, which torch.onnx keeps for initializers it does not fold. */
  param(path: string, name: string): string {
    return `${path.replaceAll("/", ".")}.${name}`;
  }

  /** A folded or transposed constant, which torch.onnx names after the op that reads it. */
  anon(op: string, dims: readonly number[], data: Float32Array): string {
    return this.g.initializer(`onnx::${op}_${++this.anonymous}`, dims, data);
  }

  reduceMean(scope: string, x: string): string {
    const keep = attr.int("keepdims", 1);
    // ReduceMean takes its axes as an input from opset 18, as an attribute before.
    if (this.spec.opset >= 18) return this.g.op(scope, "ReduceMean", [x, this.g.ints(scope, [-1])], [keep]);
    return this.g.op(scope, "ReduceMean", [x], [attr.ints("axes", [-1]), keep]);
  }

  linear(path: string, x: string, w: Linear, options: { conv1d?: boolean; output?: string } = {}): string {
    const { g } = this;
    const s = this.scope(path);
    const stored = transpose(w.weight, w.out, w.in);
    if (options.conv1d) {
      // Conv1D: size_out = x.size()[:-1] + (nf,); addmm(bias, x.view(-1, x.size(-1)), weight); view(size_out)
      const sizeOut = g.op(
        s,
        "Concat",
        [g.op(s, "Slice", [g.op(s, "Shape", [x]), g.ints(s, [0]), g.ints(s, [-1]), g.ints(s, [0])]), g.ints(s, [w.out])],
        [attr.int("axis", 0)],
      );
      const flat = g.op(s, "Reshape", [x, g.ints(s, [-1, w.in])]);
      const weight = g.initializer(this.param(path, "weight"), [w.in, w.out], stored);
      const y = g.op(s, "Gemm", [flat, weight, g.initializer(this.param(path, "bias"), [w.out], w.bias!)]);
      return g.op(s, "Reshape", [y, sizeOut], [], options.output);
    }
    const product = g.op(s, "MatMul", [x, this.anon("MatMul", [w.in, w.out], stored)], [], w.bias ? undefined : options.output);
    if (!w.bias) return product;
    return g.op(s, "Add", [g.initializer(this.param(path, "bias"), [w.out], w.bias), product], [], options.output);
  }

  /**
   * A norm over the last axis; `input` is the tensor the residual stream is read from afterwards.
   * transformers' RMSNorms begin with a cast to float32, a no-op in a float32 export after which
   * torch.onnx wires the residual Add to the Cast's output, as a real export does.
   */
  norm(path: string, x: string, n: Norm): { input: string; output: string } {
    const { g, p } = this;
    const s = this.scope(path);
    const d = p.dModel;
    const weight = (data: Float32Array) => g.initializer(this.param(path, "weight"), [d], data);
    if (this.spec.norm === "layer") {
      const bias = g.initializer(this.param(path, "bias"), [d], n.bias!);
      if (this.spec.opset >= 17) {
        const output = g.op(s, "LayerNormalization", [x, weight(n.weight), bias], [attr.int("axis", -1), attr.float("epsilon", p.eps)]);
        return { input: x, output };
      }
      const centred = g.op(s, "Sub", [x, this.reduceMean(s, x)]);
      const variance = this.reduceMean(s, g.op(s, "Pow", [centred, g.scalar(s, 2)]));
      const normed = g.op(s, "Div", [centred, g.op(s, "Sqrt", [g.op(s, "Add", [variance, g.scalar(s, p.eps)])])]);
      return { input: x, output: g.op(s, "Add", [g.op(s, "Mul", [normed, weight(n.weight)]), bias]) };
    }
    const input = g.op(s, "Cast", [x], [attr.int("to", DataType.FLOAT)]);
    const variance = this.reduceMean(s, g.op(s, "Pow", [input, g.scalar(s, 2)]));
    const rsqrt = g.op(s, "Div", [g.scalar(s, 1), g.op(s, "Sqrt", [g.op(s, "Add", [variance, g.scalar(s, p.eps)])])]);
    const normed = g.op(s, "Mul", [input, rsqrt]);
    if (this.spec.norm === "rms") {
      // Llama/Qwen2/Mistral: weight * hidden.to(input_dtype)
      return { input, output: g.op(s, "Mul", [weight(n.weight), g.op(s, "Cast", [normed], [attr.int("to", DataType.FLOAT)])]) };
    }
    // Gemma: (normed * (1 + weight)).type_as(x), with 1 + weight folded into one constant.
    const onePlus = this.anon(
      "Mul",
      [d],
      n.weight.map((v) => 1 + v),
    );
    return { input, output: g.op(s, "Cast", [g.op(s, "Mul", [normed, onePlus])], [attr.int("to", DataType.FLOAT)]) };
  }

  /** The MLP's activation under `path` (…/mlp/act or …/mlp/act_fn). */
  activation(path: string, x: string): string {
    const { g } = this;
    const s = this.scope(path);
    const mul = (a: string, b: string) => g.op(s, "Mul", [a, b]);
    const tanhGelu = (cube: string) => {
      const inner = mul(g.op(s, "Add", [x, mul(g.scalar(s, 0.044715), cube)]), g.scalar(s, Math.sqrt(2 / Math.PI)));
      return mul(mul(g.scalar(s, 0.5), x), g.op(s, "Add", [g.scalar(s, 1), g.op(s, "Tanh", [inner])]));
    };
    switch (this.spec.mlp) {
      case "gelu_new": // NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        return tanhGelu(g.op(s, "Pow", [x, g.scalar(s, 3)]));
      case "gelu_tanh_gated": // F.gelu(approximate="tanh"), which torch.onnx writes with x * x * x
        return tanhGelu(mul(x, mul(x, x)));
      case "gelu": // F.gelu: x * 0.5 * (1 + erf(x / sqrt(2)))
        return mul(
          mul(x, g.op(s, "Add", [g.op(s, "Erf", [g.op(s, "Div", [x, g.scalar(s, Math.SQRT2)])]), g.scalar(s, 1)])),
          g.scalar(s, 0.5),
        );
      case "silu_gated":
        return mul(x, g.op(s, "Sigmoid", [x]));
    }
  }

  mlp(layer: string, x: string, lw: DecoderLayerWeights): string {
    const paths = this.spec.paths;
    const m = `${layer}/${paths.mlp}`;
    const conv1d = this.spec.conv1d;
    if (lw.gate) {
      const act = this.activation(`${m}/${paths.act}`, this.linear(`${m}/${paths.gate}`, x, lw.gate));
      const hidden = this.g.op(this.scope(m), "Mul", [act, this.linear(`${m}/${paths.up}`, x, lw.up)]);
      return this.linear(`${m}/${paths.down}`, hidden, lw.down);
    }
    const hidden = this.activation(`${m}/${paths.act}`, this.linear(`${m}/${paths.up}`, x, lw.up, { conv1d }));
    return this.linear(`${m}/${paths.down}`, hidden, lw.down, { conv1d });
  }

  /** q or k [batch, heads, seq, hd] with its first rotaryDims rotated: x*cos + rotate_half(x)*sin. */
  rope(scope: string, t: string, tables: Tables): string {
    const { g, p } = this;
    const dims = rotaryDims(this.p);
    const slice = (x: string, from: number, to: number) =>
      g.op(scope, "Slice", [x, g.ints(scope, [from]), g.ints(scope, [to]), g.ints(scope, [3])]);
    const rot = dims === p.headDim ? t : slice(t, 0, dims);
    const rotated = g.op(
      scope,
      "Concat",
      [g.op(scope, "Neg", [slice(rot, dims / 2, dims)]), slice(rot, 0, dims / 2)],
      [attr.int("axis", -1)],
    );
    const embedded = g.op(scope, "Add", [g.op(scope, "Mul", [rot, tables.cos]), g.op(scope, "Mul", [rotated, tables.sin])]);
    if (dims === p.headDim) return embedded;
    return g.op(scope, "Concat", [embedded, slice(t, dims, p.headDim)], [attr.int("axis", -1)]);
  }

  /** repeat_kv: [batch, kv, seq, hd] -> [batch, heads, seq, hd]. */
  repeatKv(scope: string, t: string): string {
    const { g, p } = this;
    const groups = p.heads / p.kvHeads;
    if (groups === 1) return t;
    const expanded = g.op(scope, "Expand", [g.op(scope, "Unsqueeze", [t, g.ints(scope, [2])]), g.ints(scope, [1, 1, groups, 1, 1])]);
    return g.op(scope, "Reshape", [expanded, g.ints(scope, [0, p.heads, -1, p.headDim])]);
  }

  /** Scaled, optionally softcapped scores plus the additive mask, softmaxed, applied to v, merged. */
  attend(scope: string, q: string, k: string, v: string, mask: string): string {
    const { g, p } = this;
    let scores = g.op(scope, "MatMul", [q, g.op(scope, "Transpose", [k], [attr.ints("perm", [0, 1, 3, 2])])]);
    // GPT-2 divides by sqrt(head_dim); the others multiply by their scaling.
    scores =
      this.spec.name === "gpt2"
        ? g.op(scope, "Div", [scores, g.scalar(scope, Math.sqrt(p.headDim))])
        : g.op(scope, "Mul", [scores, g.scalar(scope, attnScale(p))]);
    if (p.attnSoftcap > 0) {
      const cap = () => g.scalar(scope, p.attnSoftcap);
      scores = g.op(scope, "Mul", [g.op(scope, "Tanh", [g.op(scope, "Div", [scores, cap()])]), cap()]);
    }
    const probs = g.op(scope, "Softmax", [g.op(scope, "Add", [scores, mask])], [attr.int("axis", -1)]);
    return g.op(scope, "Reshape", [
      g.op(scope, "Transpose", [g.op(scope, "MatMul", [probs, v])], [attr.ints("perm", [0, 2, 1, 3])]),
      g.ints(scope, [0, 0, p.heads * p.headDim]),
    ]);
  }
}
