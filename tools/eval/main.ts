import { existsSync, statSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { ConfigError, RunConfigSchema } from "../../services/common/config/index.js";
import type { ExecutionProvider } from "../../services/common/ort.js";
import { MAKE_TINY_MODEL } from "../../services/producer/session.js";
import { corpusContexts } from "./contexts.js";
import { evalTable, writeEval } from "./run.js";
import { SaeFolderError } from "./sae.js";
import { evaluateSplice } from "./splice.js";

const defaults = RunConfigSchema.parse({}).producer;

const USAGE = `usage: npx tsx tools/eval/main.ts --sae DIR [--sae DIR ...] [options]

Splices each SAE (an SAELens export folder: cfg.json + sae_weights.safetensors) into the model at
its hook point and reports the LM loss with it, without it and with the hook zeroed, the fraction
of loss recovered, the KL divergence and reconstruction figures.

  --sae DIR             SAELens export folder (repeat for several)
  --model FILE          ONNX causal LM (default: the producer's, ${defaults.model})
  --contexts N          contexts to evaluate on (default 16)
  --context-length N    tokens per context (default 128)
  --dataset PATH        text/JSONL file or folder, or builtin:corpus (default; repeat for several)
  --tokens-field NAME   JSONL records hold token ids in this field (saeflow pretokenize), not text
  --tokenizer SPEC      tokenizer.json (or its folder) or builtin:llama3_1 (default)
  --provider NAME       onnxruntime execution provider: cpu (default), cuda or webgpu
  --threads N           onnxruntime intra-op threads (default: onnxruntime's choice)
  --out FILE            also write the rows as a JSON array
`;

const PROVIDERS: readonly ExecutionProvider[] = ["cpu", "cuda", "webgpu"];

/** A bad command line: the message names the flag. */
class UsageError extends Error {}

const positiveInt = (flag: string, raw: string): number => {
  const v = Number(raw);
  if (!Number.isInteger(v) || v < 1) throw new UsageError(`--${flag}: expected a positive integer, got "${raw}"`);
  return v;
};

export interface Io {
  out: (text: string) => void;
  err: (text: string) => void;
}

/** The CLI; returns the exit code (2: bad command line, 1: evaluation failed). */
export async function runCli(
  argv: string[],
  io: Io = { out: (t) => process.stdout.write(t), err: (t) => process.stderr.write(t) },
): Promise<number> {
  try {
    const { values } = parseArgs({
      args: argv,
      options: {
        sae: { type: "string", multiple: true, default: [] },
        model: { type: "string", default: defaults.model },
        contexts: { type: "string", default: "16" },
        "context-length": { type: "string", default: String(defaults.contextLength) },
        dataset: { type: "string", multiple: true, default: defaults.dataset },
        tokenizer: { type: "string", default: defaults.tokenizer },
        "tokens-field": { type: "string", default: defaults.tokensField },
        provider: { type: "string", default: "cpu" },
        threads: { type: "string", default: "0" },
        out: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    });
    if (values.help) {
      io.out(USAGE);
      return 0;
    }
    if (values.sae.length === 0) throw new UsageError("--sae: give at least one SAELens export folder");
    for (const dir of values.sae) {
      if (!existsSync(dir) || !statSync(dir).isDirectory()) throw new UsageError(`--sae ${dir}: no such folder`);
    }
    if (!existsSync(values.model))
      throw new UsageError(`--model ${values.model}: no such file (make the tiny model with \`${MAKE_TINY_MODEL}\`)`);
    const count = positiveInt("contexts", values.contexts);
    const contextLength = positiveInt("context-length", values["context-length"]);
    if (contextLength < 2) throw new UsageError(`--context-length: at least 2 tokens, got ${contextLength}`);
    const threads = values.threads === "0" ? 0 : positiveInt("threads", values.threads);
    const provider = PROVIDERS.find((p) => p === values.provider);
    if (!provider) throw new UsageError(`--provider: expected one of ${PROVIDERS.join(", ")}, got "${values.provider}"`);

    const corpus = {
      ...defaults,
      dataset: values.dataset,
      tokenizer: values.tokenizer,
      tokensField: values["tokens-field"],
      contextLength,
    };
    const { contexts, bosId } = await corpusContexts(corpus, count, {
      log: (line) => io.err(`${line}\n`),
      keys: { tokenizer: "--tokenizer", dataset: "--dataset", tokensField: "--tokens-field" },
    });
    if (contexts.length === 0) throw new UsageError(`--dataset: holds no full context of ${contextLength} tokens`);
    if (contexts.length < count)
      io.err(`eval: the dataset holds only ${contexts.length} full contexts of ${contextLength} tokens; using those\n`);
    const started = performance.now();
    const rows = await evaluateSplice({
      modelPath: values.model,
      saeDirs: values.sae,
      contexts,
      bosId: bosId ?? null,
      provider,
      threads,
      onContext: (done, total) => io.err(`\reval: context ${done}/${total}${done === total ? "\n" : ""}`),
    });
    const seconds = (performance.now() - started) / 1000;
    io.out(`${evalTable(rows)}\n`);
    io.out(`${rows.length} SAE(s), ${contexts.length} contexts of ${contextLength} tokens, ${seconds.toFixed(1)} s\n`);
    if (values.out) {
      writeEval(resolve(values.out), rows);
      io.out(`wrote ${values.out}\n`);
    }
    return 0;
  } catch (err) {
    if (err instanceof SaeFolderError) io.err(`eval: --sae ${err.dir}: ${err.message}\n`);
    else if (err instanceof UsageError || err instanceof ConfigError) io.err(`eval: ${err.message}\n`);
    else if ((err as { code?: string }).code?.startsWith("ERR_PARSE_ARGS")) io.err(`eval: ${(err as Error).message}\n${USAGE}`);
    else {
      io.err(`eval: ${(err as Error).message}\n`);
      return 1;
    }
    return 2;
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) process.exitCode = await runCli(process.argv.slice(2));
