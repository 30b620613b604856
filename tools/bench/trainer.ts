import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import { createInterface } from "node:readline";
import ort from "onnxruntime-node";
import { ortSessionOptions } from "../../services/common/ort.js";
import { F32, GraphBuilder } from "../../services/trainer/graph/builder.js";
import type { StepSpec } from "../../services/trainer/graph/step.js";
import type { StepScalars } from "../../services/trainer/reference.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { line, round } from "./stats.js";

/**
 * Tokens per second of one training step (forward, backward, Adam, renormalisation) as the ONNX
 * step graph runs it on 2 threads, beside (a) the encoder GEMM alone in onnxruntime, the TopK step's
 * one dense product and so its floor, and (b) the same recipe written in PyTorch (Debian's
 * python3-torch, OpenBLAS, 2 threads): TopK at two sizes, then BatchTopK, Matryoshka-BatchTopK,
 * Gated and the dense step that runs while Llama Scope's k anneals, at the smaller one. The figures
 * of one line are timed in turn, step by step, so a machine shared with other work slows them alike;
 * each is a median.
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
  { name: "topk_anneal", spec: { recipe: "topk", annealK: true, k: 512 }, torch: false, label: "TopK while k anneals (dense, k=512 fed)" },
];
const WARMUP = 3;
const REPEATS = 5;
const RECIPE_WARMUP = 1;
const RECIPE_REPEATS = 3;
const PYTHON = "/usr/bin/python3";

/**
 * The same steps in PyTorch. TopK: addmm, topk, gather + bmm decode, index_add_ gradients (hand
 * derived, as the ONNX graph is). The other recipes as the libraries users know write them, with
 * autograd: BatchTopK and Matryoshka as dictionary_learning's MatryoshkaBatchTopKTrainer (batch
 * top-k into a dense code, one loss per nested prefix, summed), Gated as SAELens' GatedTrainingSAE
 * (with the gate and magnitude paths sharing one GEMM). torch.optim.Adam, then unit decoder rows.
 */
const TORCH_STEP = String.raw`
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
B = int(sys.argv[2])
step = None

def adam(params):
    return torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)

def renorm(W_dec):
    with torch.no_grad():
        W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

def topk_step(d, n, k, W_dec, x):
    W_enc = W_dec.clone(); b_enc = torch.zeros(n); b_dec = torch.zeros(d)
    params = [W_enc, b_enc, W_dec, b_dec]
    for p in params: p.grad = torch.zeros_like(p)
    opt = adam(params)
    def step():
        with torch.no_grad():
            xc = x - b_dec
            pre = torch.addmm(b_enc, xc, W_enc.t())
            vals, idx = pre.topk(k, dim=1)
            acts = vals.relu()
            wsel = W_dec[idx]
            err = torch.bmm(acts.unsqueeze(1), wsel).squeeze(1) + b_dec - x
            g = err * (2.0 / B)
            dvals = torch.bmm(wsel, g.unsqueeze(2)).squeeze(2) * (vals > 0)
            rows = idx.reshape(-1)
            W_dec.grad.zero_().index_add_(0, rows, (acts.unsqueeze(2) * g.unsqueeze(1)).reshape(-1, d))
            W_enc.grad.zero_().index_add_(0, rows, (dvals.unsqueeze(2) * xc.unsqueeze(1)).reshape(-1, d))
            b_enc.grad.zero_().index_add_(0, rows, dvals.reshape(-1))
            b_dec.grad.copy_(g.sum(0) - b_enc.grad @ W_enc)
            opt.step()
            renorm(W_dec)
    return step

def matryoshka_step(d, n, k, W_dec, x, prefixes):
    W_dec.requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_enc = torch.zeros(n, requires_grad=True); b_dec = torch.zeros(d, requires_grad=True)
    bounds = [0] + prefixes + [n]
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    opt = adam([W_enc, b_enc, W_dec, b_dec])
    def step():
        opt.zero_grad()
        pre = torch.relu((x - b_dec) @ W_enc.t() + b_enc)
        flat = pre.flatten()
        top = flat.topk(B * k, sorted=False)
        f = torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(B, n)
        x_hat = b_dec
        loss = 0.0
        for f_g, W_g in zip(f.split(sizes, dim=1), W_dec.split(sizes, dim=0)):
            x_hat = x_hat + f_g @ W_g
            loss = loss + (x - x_hat).pow(2).sum(-1).mean()
        loss.backward()
        opt.step()
        renorm(W_dec)
    return step

def gated_step(d, n, k, W_dec, x):
    W_dec.requires_grad_()
    W_enc = W_dec.detach().clone().requires_grad_()
    b_gate, r_mag, b_mag = (torch.zeros(n, requires_grad=True) for _ in range(3))
    b_dec = torch.zeros(d, requires_grad=True)
    opt = adam([W_enc, b_gate, r_mag, b_mag, W_dec, b_dec])
    def step():
        opt.zero_grad()
        enc = (x - b_dec) @ W_enc.t()
        pi_gate = enc + b_gate
        f = (pi_gate > 0).float() * torch.relu(enc * r_mag.exp() + b_mag)
        recon = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        gate = torch.relu(pi_gate)
        l1 = (gate * W_dec.norm(dim=1)).sum(-1).mean()
        aux = (gate @ W_dec.detach() + b_dec.detach() - x).pow(2).sum(-1).mean()
        (recon + l1 + aux).backward()
        opt.step()
        renorm(W_dec)
    return step

for command in sys.stdin:
    c = json.loads(command)
    if c["op"] == "init":
        d, n, k, recipe = c["d"], c["n"], c["k"], c["recipe"]
        torch.manual_seed(0)
        W_dec = torch.randn(n, d); W_dec /= W_dec.norm(dim=1, keepdim=True)
        x = torch.randn(B, d)
        if recipe == "topk": step = topk_step(d, n, k, W_dec, x)
        elif recipe == "gated": step = gated_step(d, n, k, W_dec, x)
        else: step = matryoshka_step(d, n, k, W_dec, x, c["prefixes"])
        print(json.dumps({"ok": True}), flush=True)
    else:
        t = time.perf_counter(); step()
        print(json.dumps({"ms": (time.perf_counter() - t) * 1000}), flush=True)
`;

/** A PyTorch process taking one JSON command per line and answering one JSON line each. */
class TorchStep {
  private readonly answers: AsyncIterator<string>;

  constructor(private readonly child: ChildProcessWithoutNullStreams) {
    this.answers = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }

  /** Starts PyTorch, or says why it cannot. */
  static start(): TorchStep | string {
    const probe = spawnSync(PYTHON, ["-c", "import torch"], { encoding: "utf8" });
    if (probe.error || probe.status !== 0) return `skipped: python3-torch is not installed for ${PYTHON}`;
    const env = { ...process.env, OMP_NUM_THREADS: String(THREADS), OPENBLAS_NUM_THREADS: String(THREADS) };
    return new TorchStep(spawn(PYTHON, ["-c", TORCH_STEP, String(THREADS), String(B)], { env }));
  }

  private async ask(command: object): Promise<Record<string, number>> {
    this.child.stdin.write(`${JSON.stringify(command)}\n`);
    const answer = await this.answers.next();
    if (answer.done) throw new Error(`PyTorch exited (${this.child.exitCode})`);
    return JSON.parse(answer.value) as Record<string, number>;
  }

  /** Sets up `recipe` at these sizes (batchtopk is matryoshka without prefixes). */
  async init(recipe: string, d: number, n: number, k: number, prefixes: readonly number[] = []): Promise<void> {
    await this.ask({ op: "init", recipe, d, n, k, prefixes });
  }

  async stepMs(): Promise<number> {
    return (await this.ask({ op: "step" })).ms!;
  }

  close(): void {
    this.child.stdin.end();
  }
}

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

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
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
  const sc = (): StepScalars => ({ scale: 1, lr: 1e-4, t: ++t, l1Coef: 1, k, deadIdx: [], auxK: 0, auxScale: 0 });
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

type Torch = TorchStep | string;

/** The TopK step at one size, beside the encoder GEMM and PyTorch; its figures go into `figures`, its step time comes back. */
async function topkAt(size: (typeof SIZES)[number], x: ort.Tensor, torch: Torch, figures: Record<string, number>): Promise<number> {
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
  figures: Record<string, number>,
): Promise<void> {
  const { d, n, k } = size;
  process.stdout.write(`recipes at d=${d} n=${n} k=${k} B=${B}, ${THREADS} threads, median of ${RECIPE_REPEATS}\n`);
  for (const recipe of RECIPES) {
    const spec: StepSpec = { ...BASE, recipe: "topk", dModel: d, width: n, k, ...recipe.spec };
    const ours = await stepSession(spec, spec.k);
    const withTorch = recipe.torch && typeof torch !== "string";
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

export async function run(): Promise<Record<string, number>> {
  const figures: Record<string, number> = {};
  const torch = TorchStep.start();
  if (typeof torch === "string") process.stdout.write(`(b) PyTorch reference ${torch}\n`);
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
