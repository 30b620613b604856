import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import ort from "onnxruntime-node";
import { ConfigError, type ProducerConfig } from "../common/config/index.js";
import { FieldError } from "../common/errors.js";
import { loadModel, type ModelProto } from "./model/onnx.js";
import { sessionFor } from "./model/session.js";
import { truncateAtHooks } from "./model/truncate.js";

export type ExecutionProvider = ProducerConfig["executionProvider"];

/** One forward pass's inputs: b contexts of s tokens, row-major. */
export interface ForwardInputs {
  batch: number;
  length: number;
  inputIds: BigInt64Array;
  attentionMask: BigInt64Array;
  positionIds: BigInt64Array;
}

/** A hook tensor of a forward pass, [batch, length, dModel]. fp16 outputs come as raw words. */
export interface HookOutput {
  data: Float32Array | Uint16Array;
  type: "float32" | "float16";
}

/** The language model cut after its last hook point, ready to run. */
export interface ModelSession {
  /** Width of every hook tensor (all hook points of a Llama residual stream share it). */
  readonly dModel: number;
  /** Vocabulary size from the config.json beside the model, when there is one. */
  readonly vocabSize: number | undefined;
  run(inputs: ForwardInputs): Promise<Map<string, HookOutput>>;
  release(): Promise<void>;
}

export interface SessionOptions {
  model: string;
  hookPoints: readonly string[];
  provider: ExecutionProvider;
  /** Intra-op threads; 0 lets onnxruntime choose. */
  threads: number;
}

/** The command that makes the default model, quoted where the model is missing. */
export const MAKE_TINY_MODEL = "npx tsx tools/model/tiny-llama.ts --out .cache/tiny-llama --seed 0";

const configError = (key: string, message: string) => ConfigError.at(key, message);

function readVocabSize(model: string): number | undefined {
  const config = join(dirname(model), "config.json");
  if (!existsSync(config)) return undefined;
  const value = (JSON.parse(readFileSync(config, "utf8")) as { vocab_size?: unknown }).vocab_size;
  return typeof value === "number" ? value : undefined;
}

function providerOptions(provider: ExecutionProvider, threads: number): ort.InferenceSession.SessionOptions {
  return {
    executionProviders: [provider],
    graphOptimizationLevel: "all",
    ...(threads > 0 ? { intraOpNumThreads: threads } : {}),
  };
}

async function createSession(
  cut: ModelProto,
  modelDir: string,
  provider: ExecutionProvider,
  threads: number,
): Promise<ort.InferenceSession> {
  const key = "producer.executionProvider";
  const known = ort.listSupportedBackends().map((b) => b.name);
  if (!known.includes(provider))
    throw configError(
      key,
      `${provider} is not available in this onnxruntime-node build (it has ${known.join(", ")}); set producer.executionProvider=cpu`,
    );
  try {
    return await sessionFor(cut, modelDir, providerOptions(provider, threads));
  } catch (err) {
    const msg = (err as Error).message;
    if (provider === "cpu") throw new Error(`onnxruntime cannot load the model: ${msg}`, { cause: err });
    const hint =
      provider === "cuda"
        ? "onnxruntime-node fetches its CUDA provider only when asked at install time: `ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node` on a machine with CUDA 12 and cuDNN 9; or set producer.executionProvider=cpu"
        : "WebGPU needs a GPU adapter reachable through Vulkan (libvulkan.so.1 and a GPU driver); or set producer.executionProvider=cpu";
    throw configError(key, `${provider} could not be loaded: ${msg.split("\n")[0]} (${hint})`);
  }
}

/**
 * Opens the model for a producer: checks the hook points against it, cuts it after the last one
 * (so one forward pass computes every hook tensor and nothing beyond), and runs a two-token pass
 * at once, so a provider that cannot run the graph fails at start, not on the first batch.
 */
export async function openModelSession(options: SessionOptions): Promise<ModelSession> {
  if (!existsSync(options.model)) {
    throw configError(
      "producer.model",
      `${options.model} does not exist; make the tiny test model with \`${MAKE_TINY_MODEL}\` or point producer.model at an ONNX export`,
    );
  }
  let full: ModelProto;
  try {
    full = loadModel(options.model);
  } catch (err) {
    throw configError("producer.model", `${options.model} is not an ONNX model: ${(err as Error).message}`);
  }
  let cut: ModelProto;
  try {
    cut = truncateAtHooks(full, options.hookPoints);
  } catch (err) {
    if (err instanceof FieldError) throw configError(`producer.${err.field}`, err.rawMessage);
    throw configError("producer.model", (err as Error).message);
  }
  const session = await createSession(cut, dirname(options.model), options.provider, options.threads);
  const outputs = [...options.hookPoints];
  const feeds = (inputs: ForwardInputs): Record<string, ort.Tensor> => {
    const dims = [inputs.batch, inputs.length];
    const all: Record<string, BigInt64Array> = {
      input_ids: inputs.inputIds,
      attention_mask: inputs.attentionMask,
      position_ids: inputs.positionIds,
    };
    const out: Record<string, ort.Tensor> = {};
    for (const name of session.inputNames) {
      const data = all[name];
      if (!data)
        throw configError(
          "producer.model",
          `the model has an input "${name}"; a causal LM export takes input_ids, attention_mask and position_ids`,
        );
      out[name] = new ort.Tensor("int64", data, dims);
    }
    return out;
  };
  const run = async (inputs: ForwardInputs): Promise<Map<string, HookOutput>> => {
    const result = await session.run(feeds(inputs), outputs);
    const map = new Map<string, HookOutput>();
    for (const name of outputs) {
      const t = result[name]!;
      if (t.type !== "float32" && t.type !== "float16") throw new Error(`model output ${name} is ${t.type}; expected float32 or float16`);
      map.set(name, { data: t.data as Float32Array | Uint16Array, type: t.type });
    }
    return map;
  };
  let probe: Map<string, HookOutput>;
  try {
    probe = await run({
      batch: 1,
      length: 2,
      inputIds: new BigInt64Array([1n, 2n]),
      attentionMask: new BigInt64Array([1n, 1n]),
      positionIds: new BigInt64Array([0n, 1n]),
    });
  } catch (err) {
    await session.release();
    if (err instanceof ConfigError || options.provider === "cpu") throw err;
    throw configError("producer.executionProvider", `${options.provider} cannot run the model: ${(err as Error).message.split("\n")[0]}`);
  }
  const first = probe.get(outputs[0]!)!;
  return {
    dModel: first.data.length / 2,
    vocabSize: readVocabSize(options.model),
    run,
    release: () => session.release(),
  };
}
