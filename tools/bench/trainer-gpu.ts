import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, join } from "node:path";
import { createInterface } from "node:readline";
import ort from "onnxruntime-node";
import { type ExecutionProvider, openOrtSession, ortSessionOptions } from "../../services/common/ort.js";
import { fp32ToBf16 } from "../../services/common/tensor-codec.js";
import { F32, GraphBuilder } from "../../services/trainer/graph/builder.js";
import type { StepSpec } from "../../services/trainer/graph/step.js";
import type { Placement } from "../../services/trainer/placement.js";
import { Rng } from "../../services/trainer/rng.js";
import { initState } from "../../services/trainer/sae.js";
import { StepSession } from "../../services/trainer/session.js";
import { compare, medians } from "./trainer.js";
import { line, round } from "./stats.js";

/**
 * Tokens per second of the TopK training step (AuxK, Adam, renormalisation) on a GPU provider with
 * the state resident, fed fp32 or bf16 batches from the host as training feeds them, beside (a) the
 * encoder GEMM alone on the same provider, the step's one dense product and so its roofline, and
 * (b) PyTorch on the same GPU where torch with CUDA is present: the step with autograd as SAELens
 * writes it (dense code, dense decoder), and with a sparse decoder (gather of the k active rows).
 * At Llama Scope's sizes (d=4096; n=32768 and 131072; k=50; B=4096) on a GPU; on a machine without
 * one, at small sizes on SwiftShader (Vulkan on the CPU), saying so: those figures measure the
 * code path, not a GPU.
 *
 * SAEFLOW_BENCH_PROVIDER picks the provider (webgpu, the default, or cuda); SAEFLOW_BENCH_DEVICE the
 * CUDA ordinal.
 */
const PROVIDER = (process.env.SAEFLOW_BENCH_PROVIDER ?? "webgpu") as ExecutionProvider;
const DEVICE_ID = Number(process.env.SAEFLOW_BENCH_DEVICE ?? 0);
const SWIFTSHADER = "/usr/lib/chromium/vk_swiftshader_icd.json";
const LLAMA_SCOPE = {
  batch: 4096,
  sizes: [
    { d: 4096, n: 32768, k: 50 },
    { d: 4096, n: 131072, k: 50 },
  ],
  warmup: 3,
  repeats: 10,
};
const SMALL = {
  batch: 256,
  sizes: [
    { d: 64, n: 512, k: 8 },
    { d: 64, n: 2048, k: 8 },
  ],
  warmup: 1,
  repeats: 3,
};
const INPUTS = ["fp32", "bf16"] as const;
type Input = (typeof INPUTS)[number];
const PYTHON = "/usr/bin/python3";

interface Device {
  /** The hardware, as the JSON's `device` says it. */
  name: string;
  /** A real GPU: Llama Scope's sizes; otherwise SwiftShader at small ones. */
  gpu: boolean;
}

/** The GPU nvidia-smi names, else SwiftShader (pointed at here unless a Vulkan driver was named). */
function findDevice(): Device {
  const smi = spawnSync("nvidia-smi", ["--query-gpu=name,memory.total", "--format=csv,noheader", "-i", String(DEVICE_ID)], {
    encoding: "utf8",
  });
  if (smi.status === 0 && smi.stdout.trim()) return { name: `${smi.stdout.trim()} (nvidia-smi), ${PROVIDER}`, gpu: true };
  const icd = process.env.VK_ICD_FILENAMES;
  if (icd && icd !== SWIFTSHADER) return { name: `Vulkan driver ${basename(icd)}, ${PROVIDER}`, gpu: true };
  if (!existsSync(SWIFTSHADER)) return { name: `no GPU and no SwiftShader (${SWIFTSHADER}): install chromium and libvulkan1`, gpu: false };
  process.env.VK_ICD_FILENAMES = SWIFTSHADER;
  process.env.XDG_RUNTIME_DIR ??= mkdtempSync(join(tmpdir(), "saeflow-xdg-"));
  return { name: "SwiftShader (Vulkan on the CPU, from Debian's chromium): no GPU on this machine", gpu: false };
}

/** The encoder GEMM alone, x [B, d] @ W_enc^T + b_enc, its weights made on the device; summed to a scalar so that only 4 bytes come back. */
async function gemmSession(place: Placement, B: number, d: number, n: number): Promise<ort.InferenceSession> {
  const g = new GraphBuilder("encoder_gemm");
  const x = g.input("x", F32, [B, d]);
  const pre = g.gemm(x, g.zeros([n, d], "w_enc"), { bias: g.zeros([n], "b_enc"), transB: true }, "pre");
  g.output(g.op("ReduceSum", [pre], { keepdims: 0 }, "total"), "total", F32, []);
  return openOrtSession(g.build(), ortSessionOptions(place), place.provider, "SAEFLOW_BENCH_PROVIDER");
}

/** The batch as training feeds it: fp32 rows, or bf16 words in pairs for the device to widen. */
function batchOf(input: Input, B: number, d: number): ort.Tensor {
  const rng = new Rng(0, "x");
  const rows = Float32Array.from({ length: B * d }, () => rng.normal());
  if (input === "fp32") return new ort.Tensor("float32", rows, [B, d]);
  return new ort.Tensor("uint32", new Uint32Array(Uint16Array.from(rows, fp32ToBf16).buffer), [B, d / 2]);
}

/** PyTorch on CUDA: the SAELens autograd TopK step, or the same with the decoder gathered; one JSON line per command. */
const TORCH_STEP = String.raw`
import json, sys, torch
dev = torch.device("cuda")
B = int(sys.argv[1])
step = None

def setup(d, n, k, sparse, dtype):
    torch.manual_seed(0)
    W_dec = torch.randn(n, d, device=dev)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_dec.requires_grad_()
    W_enc = W_dec.detach().t().contiguous().requires_grad_()
    b_enc = torch.zeros(n, device=dev, requires_grad=True)
    b_dec = torch.zeros(d, device=dev, requires_grad=True)
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)
    x_host = torch.randn(B, d).to(torch.bfloat16 if dtype == "bf16" else torch.float32).pin_memory()
    def run():
        x = x_host.to(dev, non_blocking=True).float()
        opt.zero_grad(set_to_none=True)
        pre = (x - b_dec) @ W_enc + b_enc
        vals, idx = pre.topk(k, dim=-1)
        acts = vals.relu()
        if sparse:
            x_hat = torch.bmm(acts.unsqueeze(1), W_dec[idx]).squeeze(1) + b_dec
        else:
            x_hat = torch.zeros_like(pre).scatter(-1, idx, acts) @ W_dec + b_dec
        (x_hat - x).pow(2).sum(-1).mean().backward()
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return run

for command in sys.stdin:
    c = json.loads(command)
    if c["op"] == "about":
        print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev), "blas": "cuBLAS"}), flush=True)
    elif c["op"] == "init":
        step = setup(c["d"], c["n"], c["k"], c["sparse"], c["dtype"])
        print(json.dumps({"ok": True}), flush=True)
    else:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); step(); end.record(); torch.cuda.synchronize()
        print(json.dumps({"ms": start.elapsed_time(end)}), flush=True)
`;

class TorchCuda {
  private readonly answers: AsyncIterator<string>;

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    this.answers = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }

  /** PyTorch with CUDA, or why not. */
  static start(B: number): TorchCuda | string {
    const probe = spawnSync(PYTHON, ["-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"], { encoding: "utf8" });
    if (probe.error || probe.status === 1) return `skipped: torch is not installed for ${PYTHON}`;
    if (probe.status !== 0) return "skipped: torch sees no CUDA device";
    return new TorchCuda(spawn(PYTHON, ["-c", TORCH_STEP, String(B)]));
  }

  private async ask(command: object): Promise<Record<string, number>> {
    this.child.stdin.write(`${JSON.stringify(command)}\n`);
    const answer = await this.answers.next();
    if (answer.done) throw new Error(`PyTorch exited (${this.child.exitCode})`);
    return JSON.parse(answer.value) as Record<string, number>;
  }

  /** torch's version, its CUDA runtime and the GPU it runs on, for the bench's JSON. */
  async about(): Promise<Record<string, string>> {
    return (await this.ask({ op: "about" })) as unknown as Record<string, string>;
  }

  async init(d: number, n: number, k: number, sparse: boolean, dtype: Input): Promise<void> {
    await this.ask({ op: "init", d, n, k, sparse, dtype });
  }

  stepMs = async () => (await this.ask({ op: "step" })).ms!;

  close(): void {
    this.child.stdin.end();
  }
}

/** Median times of the step of `spec` and of its encoder GEMM alone, in turn. */
async function timeStepAndGemm(place: Placement, plan: typeof LLAMA_SCOPE, spec: StepSpec, input: Input): Promise<number[]> {
  const { batchSize: B, dModel: d, width: n, k } = spec;
  const session = await StepSession.create(spec, initState(n, d, new Rng(0, "bench"), new Float32Array(d)), place.threads, place);
  try {
    const gemm = await gemmSession(place, B, d, n);
    try {
      const x = batchOf(input, B, d);
      const xf = batchOf("fp32", B, d);
      let t = 0;
      const step = () =>
        session.run(x, { scale: 1, lr: 1e-4, t: ++t, sparsityCoef: 0, preActCoef: 0, k, deadIdx: [], auxK: 0, auxScale: 0 });
      return await medians([step, () => gemm.run({ x: xf })], plan.warmup, plan.repeats);
    } finally {
      await gemm.release();
    }
  } finally {
    await session.close();
  }
}

/** The step on `place` at one size and input, beside the GEMM and PyTorch; figures go into `figures`. */
async function stepAt(
  place: Placement,
  plan: typeof LLAMA_SCOPE,
  size: (typeof LLAMA_SCOPE.sizes)[number],
  input: Input,
  torch: TorchCuda | string,
  figures: Record<string, number | string>,
): Promise<void> {
  const { d, n, k } = size;
  const B = plan.batch;
  const spec: StepSpec = {
    recipe: "topk",
    batchSize: B,
    dModel: d,
    width: n,
    k,
    annealK: false,
    prefixes: [],
    input: input === "bf16" ? "bf16-words" : "fp32",
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    unitNormDecoder: true,
    auxK: true,
    gradClipNorm: 0,
    int32Index: place.provider === "webgpu",
  };
  const [stepMs, gemmMs] = await timeStepAndGemm(place, plan, spec, input);
  const tok = (ms: number) => (B / ms) * 1000;
  const key = `d${d}_n${n}_k${k}_b${B}_${input}`;
  process.stdout.write(`d=${d} n=${n} k=${k} B=${B}, ${input} batches, ${place.provider}, median of ${plan.repeats}\n`);
  line("  saeflow step (TopK, AuxK, Adam, renorm)", tok(stepMs!), "tok/s");
  figures[`${key}_gemm_share_of_step_ratio`] = compare(
    "  (a) encoder GEMM alone, same provider",
    tok(gemmMs!),
    { label: "step", value: tok(stepMs!) },
    { name: "step/GEMM tok/s (goal >= 0.667)", of: [tok(stepMs!), tok(gemmMs!)] },
  );
  figures[`${key}_step_tok_s`] = round(tok(stepMs!), 1);
  figures[`${key}_gemm_tok_s`] = round(tok(gemmMs!), 1);
  if (typeof torch === "string") return;
  for (const sparse of [false, true]) {
    await torch.init(d, n, k, sparse, input);
    const [torchMs] = await medians([() => torch.stepMs()], plan.warmup, plan.repeats);
    const name = sparse ? "torch_sparse_decoder" : "torch_autograd";
    figures[`${key}_step_vs_${name}_ratio`] = compare(
      `  (b) PyTorch ${sparse ? "autograd, sparse decoder" : "autograd as SAELens"}`,
      tok(torchMs!),
      { label: "saeflow step", value: tok(stepMs!) },
      { name: "saeflow/PyTorch tok/s", of: [tok(stepMs!), tok(torchMs!)] },
    );
    figures[`${key}_${name}_tok_s`] = round(tok(torchMs!), 1);
  }
}

export async function run(): Promise<Record<string, number | string>> {
  const device = findDevice();
  const plan = device.gpu ? LLAMA_SCOPE : SMALL;
  const figures: Record<string, number | string> = {
    device: device.name,
    provider: PROVIDER,
    gpu: device.gpu ? 1 : 0,
    onnxruntime: ort.env.versions.common,
  };
  process.stdout.write(`device: ${device.name}\n`);
  if (!device.gpu) {
    process.stdout.write(`no GPU here: small sizes (B=${plan.batch}) on SwiftShader; these figures measure the code path, not a GPU\n`);
  }
  const place: Placement = { provider: PROVIDER, deviceId: DEVICE_ID, threads: 0 };
  const torch = device.gpu ? TorchCuda.start(plan.batch) : "skipped: no GPU";
  if (typeof torch === "string") {
    process.stdout.write(`(b) PyTorch on the GPU ${torch}\n`);
    figures.torch = torch;
  } else {
    const about = await torch.about();
    Object.assign(figures, { torch_version: about.torch, torch_cuda: about.cuda, torch_device: about.device, torch_blas: about.blas });
    process.stdout.write(`(b) PyTorch ${about.torch}, CUDA ${about.cuda}, ${about.blas} on ${about.device}\n`);
  }
  process.stdout.write(`(a) onnxruntime ${figures.onnxruntime}, ${PROVIDER}\n`);
  try {
    for (const size of plan.sizes) {
      for (const input of INPUTS) {
        try {
          await stepAt(place, plan, size, input, torch, figures);
        } catch (err) {
          // A size the device cannot hold says so and the others still run.
          const message = (err as Error).message.split("\n")[0]!;
          process.stdout.write(`d=${size.d} n=${size.n} k=${size.k} B=${plan.batch}, ${input}: could not run: ${message}\n`);
          figures[`d${size.d}_n${size.n}_k${size.k}_b${plan.batch}_${input}_error`] = message;
        }
      }
    }
  } finally {
    if (typeof torch !== "string") torch.close();
  }
  return figures;
}
