import ort from "onnxruntime-node";
import { ConfigError } from "./config/index.js";

/** Where onnxruntime computes: the CPU, an NVIDIA GPU through CUDA, or any GPU through WebGPU (Dawn over Vulkan). */
export type ExecutionProvider = "cpu" | "cuda" | "webgpu";

export interface OrtOptions {
  provider?: ExecutionProvider;
  /** Intra-op threads; 0 or absent lets onnxruntime choose. */
  threads?: number;
  /** CUDA device ordinal; absent is the first. WebGPU in Node takes the adapter Dawn prefers (a pod sees only its own GPU). */
  deviceId?: number;
}

/**
 * The one place onnxruntime session options are made, for the producer's model, the trainer's step
 * graphs and the evaluation's splices. Sequential execution with one inter-op thread: the graphs
 * are chains, and a second pool only competes for the cores.
 */
export function ortSessionOptions(options: OrtOptions = {}): ort.InferenceSession.SessionOptions {
  const provider = options.provider ?? "cpu";
  const threads = options.threads ?? 0;
  const device = options.deviceId ?? 0;
  const executionProvider: ort.InferenceSession.ExecutionProviderConfig =
    provider === "cuda" ? { name: "cuda", deviceId: device } : provider;
  return {
    executionProviders: [executionProvider],
    graphOptimizationLevel: "all",
    executionMode: "sequential",
    interOpNumThreads: 1,
    ...(threads > 0 ? { intraOpNumThreads: threads } : {}),
    // Warnings (e.g. initializers the optimiser folded away) are noise in a training log.
    logSeverityLevel: 3,
  };
}

/** Where a session output is left: in host memory, or in the device's memory for the next run to take back. */
export type OutputLocation = "cpu" | "gpu-buffer";

/**
 * Whether onnxruntime-node can leave outputs on `provider`'s device and take them back as inputs.
 * Its binding (1.30) binds device outputs as WebGPU buffers only: on CUDA every output comes back to
 * the host.
 */
export function keepsOutputsOnDevice(provider: ExecutionProvider): boolean {
  return provider === "webgpu";
}

/**
 * ortSessionOptions, with the named outputs left where `outputs` says (outputs it does not name come
 * back to the host). Only meaningful where keepsOutputsOnDevice(provider).
 */
export function ortDeviceSessionOptions(options: OrtOptions, outputs: Record<string, OutputLocation>): ort.InferenceSession.SessionOptions {
  return { ...ortSessionOptions(options), preferredOutputLocation: outputs };
}

const HINTS: Record<Exclude<ExecutionProvider, "cpu">, string> = {
  cuda: "onnxruntime-node fetches its CUDA provider only when asked at install time: `ONNXRUNTIME_NODE_INSTALL=cuda12 npm rebuild onnxruntime-node` on a machine with CUDA 12 and cuDNN 9",
  webgpu: "WebGPU needs a GPU adapter reachable through Vulkan (libvulkan.so.1 and a GPU driver)",
};

/**
 * Opens a session on `model`, naming `key` (e.g. producer.executionProvider) when the provider is
 * missing from this build or cannot load, with what to do about it.
 */
export async function openOrtSession(
  model: Uint8Array,
  options: ort.InferenceSession.SessionOptions,
  provider: ExecutionProvider,
  key: string,
): Promise<ort.InferenceSession> {
  const known = ort.listSupportedBackends().map((b) => b.name);
  if (!known.includes(provider)) {
    throw ConfigError.at(key, `${provider} is not available in this onnxruntime-node build (it has ${known.join(", ")}); set ${key}=cpu`);
  }
  try {
    return await ort.InferenceSession.create(model, options);
  } catch (err) {
    const msg = (err as Error).message;
    if (provider === "cpu") throw new Error(`onnxruntime cannot load the model: ${msg}`, { cause: err });
    throw ConfigError.at(key, `${provider} could not be loaded: ${msg.split("\n")[0]} (${HINTS[provider]}; or set ${key}=cpu)`);
  }
}
