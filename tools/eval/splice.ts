import { dirname } from "node:path";
import ort from "onnxruntime-node";
import { FieldError } from "../../services/common/errors.js";
import { decodeFloats, encodeFloats } from "../../services/common/tensor-codec.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { parseHook, resolveHooks } from "../../services/producer/model/hooks.js";
import { loadModel } from "../../services/producer/model/onnx.js";
import { sessionFor } from "../../services/producer/model/session.js";
import { suffixFromHook, truncateAtHooks } from "../../services/producer/model/truncate.js";
import type { ExecutionProvider } from "../../services/producer/session.js";
import { loadSae, type Sae, SaeFolderError, saeForward } from "./sae.js";
import { crossEntropy, klAt, LSE, type Scored, withLogSumExp } from "./score.js";

/**
 * How much of the model an SAE keeps when its reconstruction replaces the activation it was trained
 * on: the ONNX model is cut at the hook point into a prefix (tokens -> hook tensor) and a suffix
 * (hook tensor -> logits). Per context the prefix runs once, and the suffix once on the original
 * tensor, once on zeros and once per SAE on its reconstruction. The figures are those SAELens'
 * evals report (ce_loss_score is fraction_loss_recovered, kl_div_with_sae is kl_divergence).
 *
 * BOS positions keep their original activation in both the SAE and the zero run, and are left out
 * of every mean, as SAELens' evals do with ignore_tokens = {bos, eos, pad}: the producer drops BOS
 * rows by default (producer.excludeBos), so the SAE never saw one, and BOS's residual stream in a
 * Llama is an attention sink whose norm is far from the rest. SAELens' zero ablation zeroes BOS
 * too; here it zeroes exactly the positions the SAE replaces, so a zero SAE scores exactly 0 and
 * the baseline measures what those positions carry.
 */

export interface SpliceOptions {
  /** ONNX causal LM taking input_ids, attention_mask, position_ids and returning logits. */
  modelPath: string;
  /** SAELens export folders (cfg.json + sae_weights.safetensors); several may share a hook. */
  saeDirs: string[];
  /** Token ids of each context, at least 2 long, starting with BOS as the producer packs them. */
  contexts: number[][];
  /**
   * Id whose positions keep their activation and count in no mean; default: the first token of the
   * contexts (which must then all start with it); null when the tokenizer has no BOS.
   */
  bosId?: number | null;
  /** onnxruntime execution provider; default cpu. */
  provider?: ExecutionProvider;
  /** onnxruntime intra-op threads; 0 or absent lets onnxruntime choose. */
  threads?: number;
  /** Called after each context, for progress. */
  onContext?: (done: number, total: number) => void;
}

/** One SAE's figures, means over the evaluated tokens (JSON null where a ratio is 0/0). */
export interface SpliceResult {
  sae: string;
  hook: string;
  architecture: string;
  d_sae: number;
  /** Next-token cross-entropy (nats) of the unchanged model. */
  lm_loss_original: number;
  /** With the SAE's reconstruction spliced in. */
  lm_loss_sae: number;
  /** With the hook's activations zeroed. */
  lm_loss_zero: number;
  /** lm_loss_sae - lm_loss_original. */
  delta_lm_loss: number;
  /** (L_zero - L_sae) / (L_zero - L_orig): 1 for a perfect SAE, 0 for one no better than zeros. */
  fraction_loss_recovered: number;
  /** Mean over predicted positions of KL(p_orig || p_sae), nats. */
  kl_divergence: number;
  /** Mean over tokens of cos(x, x_hat); 0 where either is the zero vector. */
  cosine_similarity: number;
  /** E|x_hat|^2 / E[x . x_hat] (Gated SAE paper eq. 10, as SAELens and SAEBench): below 1 means shrinkage. */
  relative_reconstruction_bias: number;
  /** Mean over tokens of |x - x_hat|^2, in the model's activation units. */
  mse: number;
  /** 1 - sum |x - x_hat|^2 / sum |x - mean x|^2 over the evaluated tokens. */
  explained_variance: number;
  /** Mean active latents per token. */
  l0: number;
  /** Tokens reconstructed (non-BOS positions). */
  tokens: number;
  /** Positions in the loss and KL means (non-BOS positions that have a next token). */
  predictions: number;
}

/** Suffixes of attn_out / mlp_out hooks also read the residual stream they are added to. */
function residualInputs(hook: string): string[] {
  const { layer, kind } = parseHook(hook);
  if (kind === "hook_attn_out") return [`blocks.${layer}.hook_resid_pre`];
  if (kind === "hook_mlp_out") return [`blocks.${layer}.hook_resid_mid`];
  return [];
}

function floatsOf(t: ort.Tensor, what: string): Float32Array {
  if (t.type === "float32") return t.data as Float32Array;
  if (t.type === "float16") return decodeFloats(t.data as Uint16Array, DType.FP16);
  throw new Error(`${what} is ${t.type}; expected float32 or float16`);
}

const tensorLike = (values: Float32Array, like: ort.Tensor): ort.Tensor =>
  like.type === "float16"
    ? new ort.Tensor("float16", encodeFloats(values, DType.FP16) as Uint16Array, like.dims)
    : new ort.Tensor("float32", values, like.dims);

/** Running sums of one SAE over the contexts. */
class SaeTally {
  ce = 0;
  kl = 0;
  tokens = 0;
  active = 0;
  sse = 0;
  cos = 0;
  dot = 0;
  hatSq = 0;
  xSq = 0;
  readonly xSum: Float64Array;

  constructor(readonly sae: Sae) {
    this.xSum = new Float64Array(sae.dIn);
  }

  /** Reconstruction figures of rows x / xHat [rows, d]. */
  addRows(x: Float32Array, xHat: Float32Array, l0: Uint32Array, d: number): void {
    for (let r = 0; r < l0.length; r++) {
      let dot = 0;
      let xx = 0;
      let hh = 0;
      let err = 0;
      for (let j = r * d; j < (r + 1) * d; j++) {
        const a = x[j]!;
        const b = xHat[j]!;
        dot += a * b;
        xx += a * a;
        hh += b * b;
        err += (a - b) * (a - b);
        this.xSum[j - r * d]! += a;
      }
      this.dot += dot;
      this.xSq += xx;
      this.hatSq += hh;
      this.sse += err;
      this.cos += xx > 0 && hh > 0 ? dot / Math.sqrt(xx * hh) : 0;
      this.active += l0[r]!;
      this.tokens += 1;
    }
  }

  result(original: number, zero: number, predictions: number): SpliceResult {
    const lmSae = this.ce / predictions;
    const meanSq = this.xSum.reduce((s, v) => s + (v / this.tokens) ** 2, 0);
    const variance = this.xSq - this.tokens * meanSq;
    return {
      sae: this.sae.dir,
      hook: this.sae.hookName,
      architecture: this.sae.architecture,
      d_sae: this.sae.dSae,
      lm_loss_original: original,
      lm_loss_sae: lmSae,
      lm_loss_zero: zero,
      delta_lm_loss: lmSae - original,
      fraction_loss_recovered: (zero - lmSae) / (zero - original),
      kl_divergence: this.kl / predictions,
      cosine_similarity: this.cos / this.tokens,
      relative_reconstruction_bias: this.hatSq / this.dot,
      mse: this.sse / this.tokens,
      explained_variance: 1 - this.sse / variance,
      l0: this.active / this.tokens,
      tokens: this.tokens,
      predictions,
    };
  }
}

/** One hook point: its suffix session and the SAEs trained on it. */
interface HookGroup {
  hook: string;
  residual: string[];
  suffix: ort.InferenceSession;
  tallies: SaeTally[];
  ceOriginal: number;
  ceZero: number;
}

/** The BOS id (undefined for none), after checking the contexts. */
function checkContexts(contexts: number[][], bosId: number | null | undefined): number | undefined {
  if (contexts.length === 0) throw new Error("no contexts to evaluate on");
  contexts.forEach((c, i) => {
    if (c.length < 2) throw new Error(`context ${i} has ${c.length} tokens; next-token loss needs at least 2`);
  });
  if (bosId !== undefined) return bosId ?? undefined;
  const bos = contexts[0]![0]!;
  const off = contexts.findIndex((c) => c[0] !== bos);
  if (off >= 0) throw new Error(`context ${off} starts with ${contexts[off]![0]}, not with context 0's first token ${bos}; pass bosId`);
  return bos;
}

/** Splices each SAE into the model at its hook point and measures what the model loses. */
export async function evaluateSplice(options: SpliceOptions): Promise<SpliceResult[]> {
  const { modelPath, contexts } = options;
  if (options.saeDirs.length === 0) throw new Error("no SAE to evaluate");
  const saes = options.saeDirs.map(loadSae);
  const bos = checkContexts(contexts, options.bosId);
  const model = loadModel(modelPath);
  const graph = model.graph ?? {};
  for (const sae of saes) {
    try {
      resolveHooks(graph, [sae.hookName, ...residualInputs(sae.hookName)]);
    } catch (err) {
      const detail = err instanceof FieldError ? err.rawMessage : (err as Error).message;
      throw new SaeFolderError(sae.dir, `cfg.json hook_name "${sae.hookName}" is not a hook point of ${modelPath}: ${detail}`);
    }
  }

  const sessionOptions: ort.InferenceSession.SessionOptions = {
    executionProviders: [options.provider ?? "cpu"],
    graphOptimizationLevel: "all",
    ...(options.threads ? { intraOpNumThreads: options.threads } : {}),
  };
  const modelDir = dirname(modelPath);
  const hooks = [...new Set(saes.map((s) => s.hookName))];
  const outputs = [...new Set(hooks.flatMap((h) => [h, ...residualInputs(h)]))];
  const sessions: ort.InferenceSession[] = [];
  try {
    const prefix = await sessionFor(truncateAtHooks(model, outputs), modelDir, sessionOptions);
    sessions.push(prefix);
    const tallies = saes.map((sae) => new SaeTally(sae));
    const groups: HookGroup[] = [];
    for (const hook of hooks) {
      const residual = residualInputs(hook);
      const suffix = await sessionFor(withLogSumExp(suffixFromHook(model, hook, residual)), modelDir, sessionOptions);
      sessions.push(suffix);
      groups.push({ hook, residual, suffix, tallies: tallies.filter((t) => t.sae.hookName === hook), ceOriginal: 0, ceZero: 0 });
    }
    let predictions = 0;
    for (const [c, ids] of contexts.entries()) {
      const s = ids.length;
      const dims = [1, s];
      const feeds: Record<string, ort.Tensor> = {
        input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), dims),
        attention_mask: new ort.Tensor("int64", new BigInt64Array(s).fill(1n), dims),
        position_ids: new ort.Tensor(
          "int64",
          BigInt64Array.from({ length: s }, (_, i) => BigInt(i)),
          dims,
        ),
      };
      const inputsOf = (session: ort.InferenceSession, extra: Record<string, ort.Tensor>) =>
        Object.fromEntries(session.inputNames.map((name) => [name, extra[name] ?? feeds[name]!]));
      const acts = await prefix.run(inputsOf(prefix, {}));
      const rows = ids.flatMap((id, p) => (id === bos ? [] : [p]));
      const predicted = rows.filter((p) => p < s - 1);
      predictions += predicted.length;

      for (const group of groups) {
        const hookTensor = acts[group.hook]!;
        const x = floatsOf(hookTensor, group.hook);
        const d = hookTensor.dims[2]!;
        for (const { sae } of group.tallies) {
          if (sae.dIn !== d)
            throw new SaeFolderError(sae.dir, `cfg.json d_in is ${sae.dIn} but ${group.hook} is ${d} wide in ${modelPath}`);
        }
        const residual = Object.fromEntries(group.residual.map((name) => [name, acts[name]!]));
        const scoreWith = async (values: Float32Array): Promise<Scored> => {
          const out = await group.suffix.run(inputsOf(group.suffix, { ...residual, [group.hook]: tensorLike(values, hookTensor) }));
          return { logits: floatsOf(out.logits!, "logits"), lse: out[LSE]!.data as Float32Array };
        };
        const original = await scoreWith(x);
        const V = original.logits.length / s;
        group.ceOriginal += crossEntropy(original, ids, predicted, V);

        const zeroed = Float32Array.from(x);
        for (const p of rows) zeroed.fill(0, p * d, (p + 1) * d);
        group.ceZero += crossEntropy(await scoreWith(zeroed), ids, predicted, V);

        const xRows = new Float32Array(rows.length * d);
        rows.forEach((p, r) => xRows.set(x.subarray(p * d, (p + 1) * d), r * d));
        for (const tally of group.tallies) {
          const { recon, l0 } = saeForward(tally.sae, xRows, rows.length);
          tally.addRows(xRows, recon, l0, d);
          const spliced = Float32Array.from(x);
          rows.forEach((p, r) => spliced.set(recon.subarray(r * d, (r + 1) * d), p * d));
          const withSae = await scoreWith(spliced);
          tally.ce += crossEntropy(withSae, ids, predicted, V);
          for (const p of predicted) tally.kl += klAt(original, withSae, p, V);
        }
      }
      options.onContext?.(c + 1, contexts.length);
    }
    if (predictions === 0) throw new Error("the contexts hold no predicted position (every token is BOS or last)");
    return tallies.map((t) => {
      const g = groups.find((group) => group.hook === t.sae.hookName)!;
      return t.result(g.ceOriginal / predictions, g.ceZero / predictions, predictions);
    });
  } finally {
    for (const session of sessions) await session.release();
  }
}
