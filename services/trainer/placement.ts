import type { TrainerConfig } from "../common/config/index.js";
import type { DTypeName } from "../common/config/sections/dtype.js";
import { type ExecutionProvider, keepsOutputsOnDevice } from "../common/ort.js";

/** The config key a provider that cannot run the trainer's graphs, or hold their state, is reported under. */
export const PROVIDER_KEY = "trainer.executionProvider";

/** Where the trainer's graphs run. */
export interface Placement {
  provider: ExecutionProvider;
  /** CUDA device ordinal; WebGPU takes the adapter Dawn prefers (a pod sees only its own GPU). */
  deviceId: number;
  /** onnxruntime intra-op threads; 0 lets it choose. */
  threads: number;
}

export const placementOf = (t: TrainerConfig): Placement => ({ provider: t.executionProvider, deviceId: t.deviceId, threads: t.threads });

/** The CPU, as tests and benches place a step unless told otherwise. */
export const onCpu = (threads: number): Placement => ({ provider: "cpu", deviceId: 0, threads });

/** The SAE state stays on the device between steps (see keepsOutputsOnDevice); otherwise it lives on the host. */
export const keepsState = (p: Placement): boolean => keepsOutputsOnDevice(p.provider);

/**
 * 16-bit batches go to a step on a GPU as raw word pairs, widened on the device (half the bytes of
 * float32 cross the bus); this needs an even dModel.
 */
export const wordsOnDevice = (p: Placement, dModel: number): boolean => p.provider !== "cpu" && dModel % 2 === 0;

/**
 * The batch dtypes the batch stream widens to float32 before the step, off the training thread:
 * bf16 for the CPU (onnxruntime-node has no bf16 tensor), and both 16-bit formats for a GPU step
 * that cannot take word pairs (odd dModel), since a WebGPU device may lack shader-f16.
 */
export function widenedByStream(p: Placement, dModel: number): DTypeName[] {
  if (p.provider === "cpu") return ["bf16"];
  return wordsOnDevice(p, dModel) ? [] : ["bf16", "fp16"];
}
