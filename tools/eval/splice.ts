import { dirname } from "node:path";
import ort from "onnxruntime-node";
import { FieldError } from "../../services/common/errors.js";
import { type ExecutionProvider, ortSessionOptions } from "../../services/common/ort.js";
import { decodeFloats, encodeFloats } from "../../services/common/tensor-codec.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { parseHook, resolveHooks } from "../../services/producer/model/hooks.js";
import { loadModel, type ModelProto } from "../../services/producer/model/onnx.js";
import { sessionFor } from "../../services/producer/model/session.js";
import { suffixFromHook, truncateAtHooks } from "../../services/producer/model/truncate.js";
import { loadSae, type Sae, SaeFolderError, saeForward } from "./sae.js";
import { crossEntropy, klAt, LSE, type Scored, withLogSumExp } from "./score.js";
import { SaeTally } from "./tally.js";

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

/** One hook point: its suffix session and the SAEs trained on it. */
interface HookGroup {
  hook: string;
  residual: string[];
  suffix: ort.InferenceSession;
  tallies: SaeTally[];
  ceOriginal: number;
  ceZero: number;
}

/** The model cut for the splices: one prefix computing every hook tensor, one suffix per hook point. */
interface Splices {
  prefix: ort.InferenceSession;
  groups: HookGroup[];
  /** One per SAE, in the order of options.saeDirs. */
  tallies: SaeTally[];
  close(): Promise<void>;
}

/** One context: its inputs, the positions the SAE replaces and those with a next token to predict. */
interface ContextRun {
  ids: number[];
  feeds: Record<string, ort.Tensor>;
  rows: number[];
  predicted: number[];
}

/** One hook tensor of one context, and the suffix run on a replacement of it. */
interface HookRun {
  x: Float32Array;
  d: number;
  vocab: number;
  original: Scored;
  scoreWith(values: Float32Array): Promise<Scored>;
}

/** Splices each SAE into the model at its hook point and measures what the model loses. */
export async function evaluateSplice(options: SpliceOptions): Promise<SpliceResult[]> {
  const { saes, bos, model } = check(options);
  const splices = await openSplices(model, dirname(options.modelPath), saes, options);
  try {
    let predictions = 0;
    for (const [c, ids] of options.contexts.entries()) {
      predictions += await scoreContext(splices, ids, bos, options.modelPath);
      options.onContext?.(c + 1, options.contexts.length);
    }
    if (predictions === 0) throw new Error("the contexts hold no predicted position (every token is BOS or last)");
    return splices.tallies.map((t) => {
      const g = splices.groups.find((group) => group.hook === t.sae.hookName)!;
      return t.result(g.ceOriginal / predictions, g.ceZero / predictions, predictions);
    });
  } finally {
    await splices.close();
  }
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

/** Loads the SAEs and the model, checking the contexts and that every SAE's hook point is in the model. */
function check(options: SpliceOptions): { saes: Sae[]; bos: number | undefined; model: ModelProto } {
  if (options.saeDirs.length === 0) throw new Error("no SAE to evaluate");
  const saes = options.saeDirs.map(loadSae);
  const bos = checkContexts(options.contexts, options.bosId);
  const model = loadModel(options.modelPath);
  for (const sae of saes) {
    try {
      resolveHooks(model.graph ?? {}, [sae.hookName, ...residualInputs(sae.hookName)]);
    } catch (err) {
      const detail = err instanceof FieldError ? err.rawMessage : (err as Error).message;
      throw new SaeFolderError(sae.dir, `cfg.json hook_name "${sae.hookName}" is not a hook point of ${options.modelPath}: ${detail}`);
    }
  }
  return { saes, bos, model };
}

async function openSplices(
  model: ModelProto,
  modelDir: string,
  saes: Sae[],
  options: Pick<SpliceOptions, "provider" | "threads">,
): Promise<Splices> {
  const sessionOptions = ortSessionOptions({ provider: options.provider, threads: options.threads });
  const opened: ort.InferenceSession[] = [];
  const open = async (cut: ModelProto) => {
    const session = await sessionFor(cut, modelDir, sessionOptions);
    opened.push(session);
    return session;
  };
  const close = async () => {
    for (const session of opened) await session.release();
  };
  try {
    const hooks = [...new Set(saes.map((s) => s.hookName))];
    const prefix = await open(truncateAtHooks(model, [...new Set(hooks.flatMap((h) => [h, ...residualInputs(h)]))]));
    const tallies = saes.map((sae) => new SaeTally(sae));
    const groups: HookGroup[] = [];
    for (const hook of hooks) {
      const residual = residualInputs(hook);
      const suffix = await open(withLogSumExp(suffixFromHook(model, hook, residual)));
      groups.push({ hook, residual, suffix, tallies: tallies.filter((t) => t.sae.hookName === hook), ceOriginal: 0, ceZero: 0 });
    }
    return { prefix, groups, tallies, close };
  } catch (err) {
    await close();
    throw err;
  }
}

function contextRun(ids: number[], bos: number | undefined): ContextRun {
  const s = ids.length;
  const dims = [1, s];
  const feeds = {
    input_ids: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), dims),
    attention_mask: new ort.Tensor("int64", new BigInt64Array(s).fill(1n), dims),
    position_ids: new ort.Tensor(
      "int64",
      BigInt64Array.from({ length: s }, (_, i) => BigInt(i)),
      dims,
    ),
  };
  const rows = ids.flatMap((id, p) => (id === bos ? [] : [p]));
  return { ids, feeds, rows, predicted: rows.filter((p) => p < s - 1) };
}

/** What `session` takes: the tensors in `extra`, else the context's own inputs. */
const inputsOf = (session: ort.InferenceSession, feeds: Record<string, ort.Tensor>, extra: Record<string, ort.Tensor> = {}) =>
  Object.fromEntries(session.inputNames.map((name) => [name, extra[name] ?? feeds[name]!]));

/** Runs the prefix once and every hook's splices on one context; returns its predicted positions. */
async function scoreContext(splices: Splices, ids: number[], bos: number | undefined, modelPath: string): Promise<number> {
  const ctx = contextRun(ids, bos);
  const acts = await splices.prefix.run(inputsOf(splices.prefix, ctx.feeds));
  for (const group of splices.groups) await scoreHook(group, acts, ctx, modelPath);
  return ctx.predicted.length;
}

/** The model's loss at one hook with the original tensor, with zeros, and with each SAE's reconstruction. */
async function scoreHook(group: HookGroup, acts: ort.InferenceSession.OnnxValueMapType, ctx: ContextRun, modelPath: string): Promise<void> {
  const hookTensor = acts[group.hook]!;
  const x = floatsOf(hookTensor, group.hook);
  const d = hookTensor.dims[2]!;
  for (const { sae } of group.tallies) {
    if (sae.dIn !== d) throw new SaeFolderError(sae.dir, `cfg.json d_in is ${sae.dIn} but ${group.hook} is ${d} wide in ${modelPath}`);
  }
  const residual = Object.fromEntries(group.residual.map((name) => [name, acts[name]!]));
  const scoreWith = async (values: Float32Array): Promise<Scored> => {
    const out = await group.suffix.run(inputsOf(group.suffix, ctx.feeds, { ...residual, [group.hook]: tensorLike(values, hookTensor) }));
    return { logits: floatsOf(out.logits!, "logits"), lse: out[LSE]!.data as Float32Array };
  };
  const original = await scoreWith(x);
  const vocab = original.logits.length / ctx.ids.length;
  group.ceOriginal += crossEntropy(original, ctx.ids, ctx.predicted, vocab);

  const zeroed = Float32Array.from(x);
  for (const p of ctx.rows) zeroed.fill(0, p * d, (p + 1) * d);
  group.ceZero += crossEntropy(await scoreWith(zeroed), ctx.ids, ctx.predicted, vocab);

  const xRows = new Float32Array(ctx.rows.length * d);
  ctx.rows.forEach((p, r) => xRows.set(x.subarray(p * d, (p + 1) * d), r * d));
  const run: HookRun = { x, d, vocab, original, scoreWith };
  for (const tally of group.tallies) await scoreSae(tally, run, ctx, xRows);
}

/** One SAE on one context: its reconstruction figures, then the loss and KL with it spliced in. */
async function scoreSae(tally: SaeTally, run: HookRun, ctx: ContextRun, xRows: Float32Array): Promise<void> {
  const { x, d, vocab } = run;
  const { recon, l0 } = saeForward(tally.sae, xRows, ctx.rows.length);
  tally.addRows(xRows, recon, l0, d);
  const spliced = Float32Array.from(x);
  ctx.rows.forEach((p, r) => spliced.set(recon.subarray(r * d, (r + 1) * d), p * d));
  const withSae = await run.scoreWith(spliced);
  tally.ce += crossEntropy(withSae, ctx.ids, ctx.predicted, vocab);
  for (const p of ctx.predicted) tally.kl += klAt(run.original, withSae, p, vocab);
}
