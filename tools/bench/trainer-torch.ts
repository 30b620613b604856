import { type ChildProcessWithoutNullStreams, spawn, spawnSync } from "node:child_process";
import { createInterface } from "node:readline";

/**
 * The trainer bench's PyTorch reference on the CPU (Debian's python3-torch): each recipe's step as
 * the libraries users know write it, in a process taking one JSON command per line. Before any
 * timing it says which BLAS torch runs on; a build whose BLAS is the reference (netlib) one, or one
 * it cannot name, is refused, since a ratio against a crippled reference misleads.
 */
const PYTHON = "/usr/bin/python3";

/**
 * TopK: addmm, topk, gather + bmm decode, index_add_ gradients (hand derived, as the ONNX graph
 * is). The other recipes with autograd: BatchTopK and Matryoshka as dictionary_learning's
 * MatryoshkaBatchTopKTrainer (batch top-k into a dense code, one loss per nested prefix, summed),
 * Gated as SAELens' GatedTrainingSAE (the gate and magnitude paths sharing one GEMM), JumpReLU as
 * SAELens' JumpReLUTrainingSAE (its JumpReLU and Step autograd functions with the rectangle kernel,
 * the threshold trained directly through relu, step-mode L0, W_enc [d, n], no decoder
 * renormalisation). torch.optim.Adam; unit decoder rows after each step but for JumpReLU.
 * `about` answers what torch runs on: its version, threads, and the BLAS behind it.
 */
const TORCH_STEP = String.raw`
import ctypes, json, os, re, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
B = int(sys.argv[2])
step = None

def blas():
    cfg = torch.__config__.show()
    built = re.search(r"BLAS_INFO=(\w+)", cfg)
    out = {"built_with": built.group(1) if built else "unknown", "library": "", "kind": "unknown", "detail": ""}
    if torch.backends.mkl.is_available():
        out.update(kind="mkl", detail="MKL, linked into torch")
        return out
    mapped = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/") and parts[5] not in mapped:
                mapped.append(parts[5])
    # A generic build calls whatever libblas.so.3 resolves to (Debian: update-alternatives).
    path = next((p for p in mapped if os.path.basename(p).startswith("libblas.so")), None)
    if path is None:
        out["detail"] = "no libblas.so.3 loaded"
        return out
    out["library"] = os.path.realpath(path)
    lib = ctypes.CDLL(path)
    if hasattr(lib, "openblas_get_config"):
        lib.openblas_get_config.restype = ctypes.c_char_p
        out.update(kind="openblas", detail=f"{lib.openblas_get_config().decode()}, {lib.openblas_get_num_threads()} threads")
    elif hasattr(lib, "bli_info_get_version_str"):
        lib.bli_info_get_version_str.restype = ctypes.c_char_p
        out.update(kind="blis", detail=f"BLIS {lib.bli_info_get_version_str().decode()}")
    elif hasattr(lib, "MKL_Get_Version_String"):
        out.update(kind="mkl", detail="MKL")
    else:
        # Neither OpenBLAS, BLIS nor MKL answers: the reference BLAS (netlib), one plain loop per product.
        out.update(kind="reference", detail="reference BLAS (netlib)")
    return out

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

def rectangle(u):
    return ((u > -0.5) & (u < 0.5)).to(u)

class JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold)
    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        return (x > threshold) * grad, torch.sum(-(threshold / bw) * rectangle((x - threshold) / bw) * grad, dim=0), None

class Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold, bandwidth):
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)
    @staticmethod
    def backward(ctx, grad):
        x, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        return None, torch.sum(-(1.0 / bw) * rectangle((x - threshold) / bw) * grad, dim=0), None

def jumprelu_step(d, n, k, W_dec, x, bandwidth=0.05, l0_coefficient=1.0):
    W_dec.requires_grad_()
    W_enc = W_dec.detach().t().contiguous().requires_grad_()
    b_enc = torch.zeros(n, requires_grad=True); b_dec = torch.zeros(d, requires_grad=True)
    threshold = torch.full((n,), 0.01, requires_grad=True)
    opt = adam([W_enc, b_enc, W_dec, b_dec, threshold])
    def step():
        opt.zero_grad()
        hidden_pre = (x - b_dec) @ W_enc + b_enc
        t = threshold.relu()
        f = JumpReLU.apply(hidden_pre, t, bandwidth)
        mse = (f @ W_dec + b_dec - x).pow(2).sum(-1).mean()
        l0 = Step.apply(hidden_pre, t, bandwidth).sum(-1)
        (mse + (l0_coefficient * l0).mean()).backward()
        opt.step()
    return step

for command in sys.stdin:
    c = json.loads(command)
    if c["op"] == "about":
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "blas": blas()}), flush=True)
    elif c["op"] == "init":
        d, n, k, recipe = c["d"], c["n"], c["k"], c["recipe"]
        torch.manual_seed(0)
        W_dec = torch.randn(n, d); W_dec /= W_dec.norm(dim=1, keepdim=True)
        x = torch.randn(B, d)
        if recipe == "topk": step = topk_step(d, n, k, W_dec, x)
        elif recipe == "gated": step = gated_step(d, n, k, W_dec, x)
        elif recipe == "jumprelu_trained": step = jumprelu_step(d, n, k, W_dec, x)
        else: step = matryoshka_step(d, n, k, W_dec, x, c["prefixes"])
        print(json.dumps({"ok": True}), flush=True)
    else:
        t = time.perf_counter(); step()
        print(json.dumps({"ms": (time.perf_counter() - t) * 1000}), flush=True)
`;

/** What torch runs on, as the `about` command reports it. */
export interface TorchAbout {
  torch: string;
  threads: number;
  blas: { built_with: string; library: string; kind: "openblas" | "mkl" | "blis" | "reference" | "unknown"; detail: string };
}

/** BLAS libraries a ratio may be taken against. */
const OPTIMISED = new Set(["openblas", "mkl", "blis"]);
/** The recipes TORCH_STEP has a step for. */
const RECIPES: ReadonlySet<string> = new Set(["topk", "batchtopk", "matryoshka", "gated", "jumprelu_trained"]);

/** One line naming the BLAS torch runs on. */
export const describeBlas = (a: TorchAbout): string =>
  `${a.blas.detail || a.blas.kind}${a.blas.library ? ` (libblas.so.3 -> ${a.blas.library})` : ""}; torch built with BLAS_INFO=${a.blas.built_with}`;

/** Why a ratio against this torch would mislead, with what to install; undefined when its BLAS is an optimised one. */
export function blasRefusal(a: TorchAbout): string | undefined {
  if (OPTIMISED.has(a.blas.kind)) return undefined;
  const library = a.blas.library ? `libblas.so.3 -> ${a.blas.library}` : a.blas.detail || "no BLAS library found";
  const what =
    a.blas.kind === "reference"
      ? `the reference BLAS (netlib; ${library}), an order of magnitude slower than an optimised one`
      : `a BLAS this bench cannot name (${library})`;
  return (
    `refused: PyTorch runs on ${what}; a ratio against it would mislead. ` +
    "Install OpenBLAS (apt-get install libopenblas0-pthread), or select it if installed " +
    "(update-alternatives --set libblas.so.3-x86_64-linux-gnu /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3)"
  );
}

/** A PyTorch process taking one JSON command per line and answering one JSON line each. */
export class TorchStep {
  private readonly answers: AsyncIterator<string>;

  private constructor(private readonly child: ChildProcessWithoutNullStreams) {
    this.answers = createInterface({ input: child.stdout })[Symbol.asyncIterator]();
  }

  /**
   * Starts PyTorch on `threads` threads (torch's and OpenBLAS's) for batches of B rows, and asks
   * what it runs on; `torch` is undefined, with the reason, where it is not installed or its BLAS is
   * refused.
   */
  static async start(threads: number, B: number): Promise<{ torch?: TorchStep; about?: TorchAbout; reason?: string }> {
    const probe = spawnSync(PYTHON, ["-c", "import torch"], { encoding: "utf8" });
    if (probe.error || probe.status !== 0)
      return { reason: `skipped: python3-torch is not installed for ${PYTHON} (apt-get install python3-torch)` };
    const env = { ...process.env, OMP_NUM_THREADS: String(threads), OPENBLAS_NUM_THREADS: String(threads) };
    const torch = new TorchStep(spawn(PYTHON, ["-c", TORCH_STEP, String(threads), String(B)], { env }));
    const about = (await torch.ask({ op: "about" })) as unknown as TorchAbout;
    const reason = blasRefusal(about);
    if (!reason) return { torch, about };
    torch.close();
    return { about, reason };
  }

  /** Whether this reference has a step for `recipe`. */
  has(recipe: string): boolean {
    return RECIPES.has(recipe);
  }

  private async ask(command: object): Promise<Record<string, unknown>> {
    this.child.stdin.write(`${JSON.stringify(command)}\n`);
    const answer = await this.answers.next();
    if (answer.done) throw new Error(`PyTorch exited (${this.child.exitCode})`);
    return JSON.parse(answer.value) as Record<string, unknown>;
  }

  /** Sets up `recipe` at these sizes (batchtopk is matryoshka without prefixes). */
  async init(recipe: string, d: number, n: number, k: number, prefixes: readonly number[] = []): Promise<void> {
    await this.ask({ op: "init", recipe, d, n, k, prefixes });
  }

  async stepMs(): Promise<number> {
    return (await this.ask({ op: "step" })).ms as number;
  }

  close(): void {
    this.child.stdin.end();
  }
}
