import { dirname, resolve } from "node:path";
import * as ort from "onnxruntime-node";
import { encodeModel, type ModelProto } from "./onnx.js";
import { truncateAtHooks } from "./truncate.js";

/**
 * `options` for a model handed to onnxruntime as bytes that was read from a file in `modelDir`. A
 * model loaded from a path resolves its external data relative to that path; one handed over as
 * bytes is told the folder through this session config entry.
 */
export function withModelFolder(options: ort.InferenceSession.SessionOptions, modelDir: string): ort.InferenceSession.SessionOptions {
  const extra = (options.extra ?? {}) as Record<string, unknown>;
  const session = {
    ...(extra.session as Record<string, unknown> | undefined),
    model_external_initializers_file_folder_path: resolve(modelDir),
  };
  return { ...options, extra: { ...extra, session } };
}

/**
 * A session on `model` (read from a file in `modelDir`, then rewritten), created from memory so
 * nothing is written beside a possibly read-only model.
 */
export function sessionFor(
  model: ModelProto,
  modelDir: string,
  options: ort.InferenceSession.SessionOptions = {},
): Promise<ort.InferenceSession> {
  return ort.InferenceSession.create(encodeModel(model), withModelFolder(options, modelDir));
}

/**
 * The model at `modelPath` truncated after its last hook point: it takes the original inputs
 * (input_ids, attention_mask, position_ids) and returns one output per hook point, named by the
 * hook, so one run feeds them all.
 */
export function openHookSession(
  modelPath: string,
  hookNames: readonly string[],
  options: ort.InferenceSession.SessionOptions = {},
): Promise<ort.InferenceSession> {
  return sessionFor(truncateAtHooks(modelPath, hookNames), dirname(modelPath), options);
}
