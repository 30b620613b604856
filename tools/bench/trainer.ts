import { cpus } from "node:os";
import ort from "onnxruntime-node";
import { ortSessionOptions } from "../../services/common/ort.js";
import { F32, GraphBuilder } from "../../services/trainer/graph/builder.js";
import type { StepSpec } from "../../services/trainer/graph/step.js";
import type { StepScalars } from "../../services/trainer/reference.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { line, median, round, timed } from "./stats.js";
import { describeBlas, TorchStep } from "./trainer-torch.js";

/**
 * Tokens per second of one training step (forward, backward, Adam, renormalisation) as the ONNX
 * step graph runs it on 2 threads, beside (a) the encoder GEMM alone in onnxruntime, the TopK step's
 * one dense product and so its floor, and (b) the same recipe written in PyTorch (Debian's
 * python3-torch on OpenBLAS, 2 threads; see trainer-torch.ts, which refuses a reference BLAS): TopK
 * at two sizes, then BatchTopK, Matryoshka-BatchTopK, Gated, JumpReLU trained directly and the
 * dense step that runs while Llama Scope's k anneals, at the smaller one. The figures of one line
 * are timed in turn, step by step, so a machine shared with other work slows them alike; each is a
 * median. The output and the JSON say what the references ran on: onnxruntime's version and
 * threads, torch's version, threads and BLAS library.
 */
const THREADS = 2;
const B = 4096;
const SIZES = [
  { d: 512, n: 8192, k: 32 },
  { d: 768, n: 24576, k: 32 },
];
/** The recipes beyond TopK, at the first size; their steps are dense or near it, so fewer repeats. */
const RECIPES: Array<{ name: string; spec: Partial<StepSpec>; torch: boolean; label: string }> = [
  { name: "batchtopk", spec: { recipe: "batchtopk" }, torch: true, label: "BatchTopK" },
  {
    name: "matryoshka",
    spec: { recipe: "matryoshka", prefixes: [1024, 4096] },
    torch: true,
    label: "Matryoshka-BatchTopK, prefixes 1024, 4096",
  },
  { name: "gated", spec: { recipe: "gated" }, torch: true, label: "Gated" },
  // As SAELens trains it: free decoder norms, step-mode L0 with its defaults (bandwidth 0.05, coefficient 1).
  {
    name: "jumprelu_trained",
    spec: { recipe: "jumprelu_trained", unitNormDecoder: false },
    torch: true,
    label: "JumpReLU trained (L0, as SAELens)",
  },
  { name: "topk_anneal", spec: { recipe: "topk", annealK: true, k: 512 }, torch: false, label: "TopK while k anneals (dense, k=512 fed)" },
];
const WARMUP = 3;
const REPEATS = 5;
const RECIPE_WARMUP = 1;
const RECIPE_REPEATS = 3;

async function gemmSession(d: number, n: number, x: ort.Tensor): Promise<{ run: () => Promise<void>; close: () => Promise<void> }> {
  const g = new GraphBuilder("encoder_gemm");
  const xs = g.input("x", F32, [B, d]);
  const w = g.input("W_enc", F32, [n, d]);
  const b = g.input("b_enc", F32, [n]);
  g.output(g.gemm(xs, w, { bias: b, transB: true }, "pre"), "pre", F32, [B, n]);
  const session = await ort.InferenceSession.create(g.build(), ortSessionOptions({ threads: THREADS }));
  const rng = new Rng(0, "w");
  const feeds = {
    x,
    W_enc: new ort.Tensor(
      "float32",
      Float32Array.from({ length: n * d }, () => rng.normal()),
      [n, d],
    ),
    b_enc: new ort.Tensor("float32", new Float32Array(n), [n]),
  };
  const pre = new ort.Tensor("float32", new Float32Array(B * n), [B, n]);
  return { run: async () => void (await session.run(feeds, { pre })), close: () => session.release() };
}

const tok = (ms: number) => (B / ms) * 1000;

/**
 * Prints a figure in tok/s beside its reference and one ratio, named for what it divides; returns
 * that ratio as the JSON holds it, so the printed and the recorded ratio are the same number.
 */
export function compare(
  label: string,
  value: number,
  reference: { label: string; value: number },
  ratio: { name: string; of: [number, number] },
): number {
  const r = round(ratio.of[0] / ratio.of[1]);
  const ref = `vs ${reference.label} ${reference.value.toFixed(3)} tok/s   ${ratio.name} ${r.toFixed(3)}`;
  process.stdout.write(`${label.padEnd(44)} ${value.toFixed(3).padStart(10)} tok/s   ${ref}\n`);
  return r;
}

/** An ONNX step session of `spec` over fresh weights, and a function running one step. */
async function stepSession(spec: StepSpec, k: number): Promise<{ session: StepSession; step: (x: ort.Tensor) => Promise<unknown> }> {
  const session = await StepSession.create(
    spec,
    initState(spec.width, spec.dModel, new Rng(0, "bench"), new Float32Array(spec.dModel), { recipe: spec.recipe }),
    THREADS,
  );
  let t = 0;
  const sc = (): StepScalars => ({ scale: 1, lr: 1e-4, t: ++t, sparsityCoef: 1, preActCoef: 0, k, deadIdx: [], auxK: 0, auxScale: 0 });
  return { session, step: (x) => session.run(x, sc()) };
}

/** Runs the timed functions of one line in turn, warm-up first, and returns their medians. */
export async function medians(fns: Array<() => Promise<unknown>>, warmup: number, repeats: number): Promise<number[]> {
  const times = fns.map(() => [] as number[]);
  // The first steps also fault in the state buffers and onnxruntime's arena; they are not timed.
  for (let r = 0; r < warmup + repeats; r++) {
    for (let i = 0; i < fns.length; i++) {
      const ms = await timed(fns[i]!);
      if (r >= warmup) times[i]!.push(ms);
    }
  }
  return times.map(median);
}

const BASE = {
  batchSize: B,
  annealK: false,
  prefixes: [],
  input: "fp32",
  beta1: 0.9,
  beta2: 0.999,
  eps: 1e-8,
  unitNormDecoder: true,
  auxK: false,
  gradClipNorm: 0,
} as const;

/** PyTorch, or why there is no PyTorch reference. */
type Torch = TorchStep | string;

/** The TopK step at one size, beside the encoder GEMM and PyTorch; its figures go into `figures`, its step time comes back. */
async function topkAt(
  size: (typeof SIZES)[number],
  x: ort.Tensor,
  torch: Torch,
  figures: Record<string, number | string>,
): Promise<number> {
  const { d, n, k } = size;
  const topk = await stepSession({ ...BASE, recipe: "topk", dModel: d, width: n, k }, k);
  const gemm = await gemmSession(d, n, x);
  if (typeof torch !== "string") await torch.init("topk", d, n, k);
  const [stepMs, gemmMs, torchMs] = await medians(
    [() => topk.step(x), gemm.run, ...(typeof torch === "string" ? [] : [() => torch.stepMs()])],
    WARMUP,
    REPEATS,
  );
  await topk.session.close();
  await gemm.close();

  const key = `d${d}_n${n}_k${k}`;
  process.stdout.write(`d=${d} n=${n} k=${k} B=${B}, ${THREADS} threads, median of ${REPEATS}\n`);
  line("  onnxruntime step (TopK, Adam, renorm)", tok(stepMs!), "tok/s");
  figures[`${key}_gemm_share_of_step_ratio`] = compare(
    "  (a) onnxruntime encoder GEMM alone",
    tok(gemmMs!),
    { label: "step", value: tok(stepMs!) },
    { name: "step/GEMM tok/s (the GEMM's share of the step)", of: [tok(stepMs!), tok(gemmMs!)] },
  );
  figures[`${key}_step_tok_s`] = round(tok(stepMs!), 1);
  figures[`${key}_gemm_tok_s`] = round(tok(gemmMs!), 1);
  if (torchMs !== undefined) {
    figures[`${key}_step_vs_torch_ratio`] = compare(
      "  (b) PyTorch same step",
      tok(torchMs),
      { label: "onnxruntime step", value: tok(stepMs!) },
      { name: "saeflow/PyTorch tok/s", of: [tok(stepMs!), tok(torchMs)] },
    );
    figures[`${key}_torch_tok_s`] = round(tok(torchMs), 1);
  }
  return stepMs!;
}

/** The recipes beyond TopK at one size, beside its TopK step (`topkMs`) and PyTorch. */
async function recipesAt(
  size: (typeof SIZES)[number],
  x: ort.Tensor,
  topkMs: number,
  torch: Torch,
  figures: Record<string, number | string>,
): Promise<void> {
  const { d, n, k } = size;
  process.stdout.write(`recipes at d=${d} n=${n} k=${k} B=${B}, ${THREADS} threads, median of ${RECIPE_REPEATS}\n`);
  for (const recipe of RECIPES) {
    const spec: StepSpec = { ...BASE, recipe: "topk", dModel: d, width: n, k, ...recipe.spec };
    const ours = await stepSession(spec, spec.k);
    const withTorch = recipe.torch && typeof torch !== "string" && torch.has(spec.recipe);
    if (withTorch) await torch.init(spec.recipe, d, n, k, spec.prefixes);
    const [oursMs, theirsMs] = await medians(
      [() => ours.step(x), ...(withTorch ? [() => torch.stepMs()] : [])],
      RECIPE_WARMUP,
      RECIPE_REPEATS,
    );
    await ours.session.close();
    const rk = `d${d}_n${n}_k${k}_${recipe.name}`;
    figures[`${rk}_vs_topk_ratio`] = compare(
      `  onnxruntime ${recipe.label}`,
      tok(oursMs!),
      { label: "TopK step", value: tok(topkMs) },
      { name: "recipe/TopK tok/s", of: [tok(oursMs!), tok(topkMs)] },
    );
    figures[`${rk}_step_tok_s`] = round(tok(oursMs!), 1);
    if (theirsMs !== undefined) {
      figures[`${rk}_step_vs_torch_ratio`] = compare(
        `  (b) PyTorch ${recipe.label}`,
        tok(theirsMs),
        { label: "onnxruntime", value: tok(oursMs!) },
        { name: "saeflow/PyTorch tok/s", of: [tok(oursMs!), tok(theirsMs)] },
      );
      figures[`${rk}_torch_tok_s`] = round(tok(theirsMs), 1);
    } else if (!recipe.torch) {
      process.stdout.write(`  (b) no PyTorch reference for ${recipe.label}\n`);
    }
  }
}

/** Starts PyTorch and states what both references run on, in the output and in `figures`. */
async function references(figures: Record<string, number | string>): Promise<Torch> {
  const onnxruntime = ort.env.versions.common;
  Object.assign(figures, { threads: THREADS, onnxruntime, cpu: cpus()[0]?.model ?? "unknown" });
  process.stdout.write(`(a) onnxruntime ${onnxruntime} (CPU provider), ${THREADS} intra-op threads; CPU ${figures.cpu}\n`);
  const { torch, about, reason } = await TorchStep.start(THREADS, B);
  if (about) {
    Object.assign(figures, {
      torch_version: about.torch,
      torch_threads: about.threads,
      torch_blas: describeBlas(about),
      torch_blas_kind: about.blas.kind,
    });
    process.stdout.write(`(b) PyTorch ${about.torch}, ${about.threads} threads, BLAS: ${describeBlas(about)}\n`);
  } else {
    figures.torch_blas = "none: no PyTorch";
  }
  if (reason) {
    figures.torch_refused = reason;
    process.stdout.write(`(b) PyTorch reference ${reason}\n`);
  }
  return torch ?? reason!;
}

export async function run(): Promise<Record<string, number | string>> {
  const figures: Record<string, number | string> = {};
  const torch = await references(figures);
  try {
    for (const [i, size] of SIZES.entries()) {
      const rng = new Rng(0, "x");
      const x = new ort.Tensor(
        "float32",
        Float32Array.from({ length: B * size.d }, () => rng.normal()),
        [B, size.d],
      );
      const topkMs = await topkAt(size, x, torch, figures);
      // The other recipes' steps are dense or near it: the first size tells how they compare.
      if (i === 0) await recipesAt(size, x, topkMs, torch, figures);
    }
  } finally {
    if (typeof torch !== "string") torch.close();
  }
  return figures;
}
