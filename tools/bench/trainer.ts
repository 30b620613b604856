import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import { createInterface } from "node:readline";
import ort from "onnxruntime-node";
import { F32, GraphBuilder } from "../../services/trainer/graph/builder.js";
import type { StepSpec } from "../../services/trainer/graph/step.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState } from "../../services/trainer/sae.js";
import { sessionOptions, StepSession } from "../../services/trainer/session.js";
import { line, round } from "./stats.js";

/**
 * Tokens per second of one TopK training step (forward, backward, Adam, renormalisation) as the ONNX
 * step graph runs it on 2 threads, beside (a) the encoder GEMM alone in onnxruntime, the step's one
 * dense product and so its floor, and (b) the same algorithm written in PyTorch (Debian's
 * python3-torch, OpenBLAS, 2 threads). The three are timed in turn, step by step, so a machine
 * shared with other work slows them alike; each figure is a median.
 */
const THREADS = 2;
const B = 4096;
const SIZES = [
  { d: 512, n: 8192, k: 32 },
  { d: 768, n: 24576, k: 32 },
];
const WARMUP = 3;
const REPEATS = 5;
const PYTHON = "/usr/bin/python3";

/** The same step in PyTorch: addmm, topk, gather + bmm decode, index_add_ gradients, torch.optim.Adam. */
const TORCH_STEP = String.raw`
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
B = int(sys.argv[2])
step = None
for command in sys.stdin:
    c = json.loads(command)
    if c["op"] == "init":
        d, n, k = c["d"], c["n"], c["k"]
        torch.manual_seed(0)
        W_dec = torch.randn(n, d); W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.clone(); b_enc = torch.zeros(n); b_dec = torch.zeros(d)
        params = [W_enc, b_enc, W_dec, b_dec]
        for p in params: p.grad = torch.zeros_like(p)
        opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
        x = torch.randn(B, d)
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
                W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
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

  async init(d: number, n: number, k: number): Promise<void> {
    await this.ask({ op: "init", d, n, k });
  }

  async stepMs(): Promise<number> {
    return (await this.ask({ op: "step" })).ms!;
  }

  close(): void {
    this.child.stdin.end();
  }
}

async function gemmSession(d: number, n: number, x: ort.Tensor): Promise<{ run: () => Promise<void>; release: () => Promise<void> }> {
  const g = new GraphBuilder("encoder_gemm");
  const xs = g.input("x", F32, [B, d]);
  const w = g.input("W_enc", F32, [n, d]);
  const b = g.input("b_enc", F32, [n]);
  g.output(g.gemm(xs, w, { bias: b, transB: true }, "pre"), "pre", F32, [B, n]);
  const session = await ort.InferenceSession.create(g.build(), sessionOptions(THREADS));
  const rng = new Rng(0, "w");
  const feeds = { x, W_enc: new ort.Tensor("float32", Float32Array.from({ length: n * d }, () => rng.normal()), [n, d]), b_enc: new ort.Tensor("float32", new Float32Array(n), [n]) };
  const pre = new ort.Tensor("float32", new Float32Array(B * n), [B, n]);
  return { run: async () => void (await session.run(feeds, { pre })), release: () => session.release() };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

export async function run(): Promise<Record<string, number>> {
  const figures: Record<string, number> = {};
  const torch = TorchStep.start();
  if (typeof torch === "string") process.stdout.write(`(b) PyTorch reference ${torch}\n`);
  try {
    for (const { d, n, k } of SIZES) {
      const rng = new Rng(0, "x");
      const x = new ort.Tensor("float32", Float32Array.from({ length: B * d }, () => rng.normal()), [B, d]);
      const spec: StepSpec = { recipe: "topk", batchSize: B, dModel: d, width: n, k, input: "fp32", beta1: 0.9, beta2: 0.999, eps: 1e-8, unitNormDecoder: true, auxK: false };
      const step = await StepSession.create(spec, initState(n, d, new Rng(0, "bench"), new Float32Array(d)), THREADS);
      const gemm = await gemmSession(d, n, x);
      if (typeof torch !== "string") await torch.init(d, n, k);
      const times = { step: [] as number[], gemm: [] as number[], torch: [] as number[] };
      let t = 0;
      // The first steps also fault in the state buffers and onnxruntime's arena; they are not timed.
      for (let r = 0; r < WARMUP + REPEATS; r++) {
        const s = await timed(() => step.run(x, { scale: 1, lr: 1e-4, t: ++t, l1Coef: 0, deadIdx: [], auxK: 0, auxScale: 0 }));
        const g = await timed(gemm.run);
        const p = typeof torch === "string" ? 0 : await torch.stepMs();
        if (r < WARMUP) continue;
        times.step.push(s);
        times.gemm.push(g);
        times.torch.push(p);
      }
      await step.release();
      await gemm.release();

      const key = `d${d}_n${n}_k${k}`;
      const tok = (ms: number) => (B / ms) * 1000;
      const [stepMs, gemmMs, torchMs] = [median(times.step), median(times.gemm), median(times.torch)];
      process.stdout.write(`d=${d} n=${n} k=${k} B=${B}, ${THREADS} threads, median of ${REPEATS}\n`);
      line("  onnxruntime step (TopK, Adam, renorm)", tok(stepMs), "tok/s");
      line("  (a) onnxruntime encoder GEMM alone", tok(gemmMs), "tok/s", { label: "step", value: tok(stepMs) });
      figures[`${key}_step_tok_s`] = round(tok(stepMs), 1);
      figures[`${key}_gemm_tok_s`] = round(tok(gemmMs), 1);
      figures[`${key}_gemm_share_of_step_ratio`] = round(gemmMs / stepMs);
      if (typeof torch !== "string") {
        line("  (b) PyTorch same step", tok(torchMs), "tok/s", { label: "onnxruntime step", value: tok(stepMs) });
        figures[`${key}_torch_tok_s`] = round(tok(torchMs), 1);
        figures[`${key}_step_vs_torch_ratio`] = round(torchMs / stepMs);
      }
    }
  } finally {
    if (typeof torch !== "string") torch.close();
  }
  return figures;
}
