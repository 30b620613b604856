import { existsSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import ort from "onnxruntime-node";
import { ConfigError } from "../common/config/index.js";
import { FieldError } from "../common/errors.js";
import { type ExecutionProvider, openOrtSession, ortSessionOptions } from "../common/ort.js";
import { encodeModel, loadModel, type ModelProto } from "./model/onnx.js";
import { withModelFolder } from "./model/session.js";
import { truncateAtHooks } from "./model/truncate.js";

export type { ExecutionProvider } from "../common/ort.js";

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
  /** The pass runs on a thread of its own, so the producer's thread stays free meanwhile (see model-thread.ts). */
  readonly ownThread: boolean;
  /** Releases the onnxruntime session (and its device memory). */
  close(): Promise<void>;
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

function readVocabSize(model: string): number | undefined {
  const config = join(dirname(model), "config.json");
  if (!existsSync(config)) return undefined;
  const value = (JSON.parse(readFileSync(config, "utf8")) as { vocab_size?: unknown }).vocab_size;
  return typeof value === "number" ? value : undefined;
}

/** The model at options.model cut after its last hook point, each failure naming the key at fault. */
function cutModel(options: SessionOptions): ModelProto {
  if (!existsSync(options.model)) {
    throw ConfigError.at(
      "producer.model",
      `${options.model} does not exist; make the tiny test model with \`${MAKE_TINY_MODEL}\` or point producer.model at an ONNX export`,
    );
  }
  let full: ModelProto;
  try {
    full = loadModel(options.model);
  } catch (err) {
    throw ConfigError.at("producer.model", `${options.model} is not an ONNX model: ${(err as Error).message}`);
  }
  try {
    return truncateAtHooks(full, options.hookPoints);
  } catch (err) {
    if (err instanceof FieldError) throw ConfigError.at(`producer.${err.field}`, err.rawMessage);
    throw ConfigError.at("producer.model", (err as Error).message);
  }
}

/** Runs one forward pass of `session`, feeding the inputs it names and fetching the hook tensors `outputs`. */
function forwardPass(session: ort.InferenceSession, outputs: readonly string[]) {
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
        throw ConfigError.at(
          "producer.model",
          `the model has an input "${name}"; a causal LM export takes input_ids, attention_mask and position_ids`,
        );
      out[name] = new ort.Tensor("int64", data, dims);
    }
    return out;
  };
  return async (inputs: ForwardInputs): Promise<Map<string, HookOutput>> => {
    const result = await session.run(feeds(inputs), [...outputs]);
    const map = new Map<string, HookOutput>();
    for (const name of outputs) {
      const t = result[name]!;
      if (t.type !== "float32" && t.type !== "float16") throw new Error(`model output ${name} is ${t.type}; expected float32 or float16`);
      map.set(name, { data: t.data as Float32Array | Uint16Array, type: t.type });
    }
    return map;
  };
}

/**
 * Opens the model on the calling thread: checks the hook points against it, cuts it after the last
 * one (so one forward pass computes every hook tensor and nothing beyond), and runs a two-token
 * pass at once, so a provider that cannot run the graph fails at start, not on the first batch.
 * onnxruntime-node runs a session on the thread that calls run() and returns only when the pass is
 * done; on a GPU provider the producer opens it on a thread of its own (model-thread.ts).
 */
export async function openModelHere(options: SessionOptions): Promise<ModelSession> {
  const cut = cutModel(options);
  const session = await openOrtSession(
    encodeModel(cut),
    withModelFolder(ortSessionOptions({ provider: options.provider, threads: options.threads }), dirname(options.model)),
    options.provider,
    "producer.executionProvider",
  );
  const run = forwardPass(session, options.hookPoints);
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
    throw ConfigError.at(
      "producer.executionProvider",
      `${options.provider} cannot run the model: ${(err as Error).message.split("\n")[0]}`,
    );
  }
  const first = probe.get(options.hookPoints[0]!)!;
  return {
    dModel: first.data.length / 2,
    vocabSize: readVocabSize(options.model),
    run,
    ownThread: false,
    close: () => session.release(),
  };
}
