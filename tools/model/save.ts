import { closeSync, openSync, writeFileSync, writeSync } from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { encodeModel, hasExternalData, type ModelProto, onnx, type TensorProto } from "../../services/producer/model/onnx.js";

/**
 * Writing models. An external-data `location` is relative to the model file, and onnxruntime
 * refuses one that leaves the model's folder (symlinks included), so a rewritten model that keeps
 * its weights in the original data file must be written beside it; the weights are never read.
 */

const EXTERNAL = onnx.TensorProto.DataLocation.EXTERNAL;

/** Writes `model` to `path`; `sourceDir` is the folder of the file it was read from. */
export function saveModel(model: ModelProto, path: string, sourceDir: string = dirname(path)): void {
  if (hasExternalData(model) && resolve(dirname(path)) !== resolve(sourceDir)) {
    throw new Error(
      `${path}: the model keeps its weights in external data in ${sourceDir}; write it into that folder, since onnxruntime refuses external data outside the model's folder`,
    );
  }
  writeFileSync(path, encodeModel(model));
}

/** Pages are the unit onnx's own writer aligns external tensors to, so the data file can be mapped. */
const ALIGN = 4096;

/**
 * Writes `model` to `path` with every initializer's raw data moved to one file beside it
 * (`<name>_data`, the layout of optimum's large exports), and returns the name of that file.
 */
export function saveWithExternalData(model: ModelProto, path: string): string {
  const dataName = `${basename(path)}_data`;
  const fd = openSync(join(dirname(path), dataName), "w");
  let offset = 0;
  try {
    const graph = model.graph ?? {};
    const initializer = (graph.initializer ?? []).map((t): TensorProto => {
      const raw = t.rawData;
      if (!raw || raw.byteLength === 0) return t;
      offset = Math.ceil(offset / ALIGN) * ALIGN;
      writeSync(fd, raw, 0, raw.byteLength, offset);
      const entry = (key: string, value: string) => ({ key, value });
      const moved = {
        ...t,
        rawData: null,
        dataLocation: EXTERNAL,
        externalData: [entry("location", dataName), entry("offset", String(offset)), entry("length", String(raw.byteLength))],
      };
      offset += raw.byteLength;
      return moved;
    });
    writeFileSync(path, encodeModel({ ...model, graph: { ...graph, initializer } }));
  } finally {
    closeSync(fd);
  }
  return dataName;
}
