import { existsSync, statSync } from "node:fs";
import { resolve } from "node:path";
import { ConfigError, type RunConfig } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { loadModel, type ModelProto } from "../../services/producer/model/onnx.js";
import { truncateAtHooks } from "../../services/producer/model/truncate.js";
import { loadTokenizerAndDataset } from "../../services/producer/prepare.js";
import { MAKE_TINY_MODEL } from "../../services/producer/session.js";

/**
 * What `saeflow up` can check before it starts anything, with the producer's own loaders: the
 * tokenizer loads (and has the BOS the packing asks for), the dataset names files (pretokenized
 * ones made by that tokenizer and read from their field), and the model is an ONNX graph holding
 * every hook point. Each failure is the ConfigError naming the key, so a bad path ends the command
 * at once instead of as a role's exit code mid-start. What needs onnxruntime (the execution
 * provider, the hook widths) stays with the producer, which alone should hold the model's memory
 * and the accelerator.
 *
 * Paths resolve from `root`, the folder the role processes run in.
 */
export function checkBeforeStart(root: string, config: RunConfig): void {
  const p = config.producer;
  const fromRoot = (path: string) => (path.startsWith("builtin:") ? path : resolve(root, path));
  loadTokenizerAndDataset({ ...p, tokenizer: fromRoot(p.tokenizer), dataset: p.dataset.map(fromRoot) });
  checkModel(fromRoot(p.model), p.hookPoints);
}

function checkModel(path: string, hookPoints: readonly string[]): void {
  if (!existsSync(path) || !statSync(path).isFile()) {
    throw ConfigError.at(
      "producer.model",
      `${path} does not exist; make the tiny test model with \`${MAKE_TINY_MODEL}\` or point producer.model at an ONNX export`,
    );
  }
  let model: ModelProto;
  try {
    model = loadModel(path);
  } catch (err) {
    throw ConfigError.at("producer.model", `${path} is not an ONNX model: ${(err as Error).message}`);
  }
  try {
    truncateAtHooks(model, hookPoints);
  } catch (err) {
    if (err instanceof FieldError) throw ConfigError.at(`producer.${err.field}`, err.rawMessage);
    throw ConfigError.at("producer.model", (err as Error).message);
  }
}
