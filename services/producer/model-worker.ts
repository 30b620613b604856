import { parentPort, workerData } from "node:worker_threads";
import { wireError } from "../common/worker.js";
import { type FromModelThread, OPEN, type ToModelThread } from "./model-thread.js";
import { type ModelSession, openModelHere, type SessionOptions } from "./session.js";

/**
 * The producer's model thread (see model-thread.ts): opens the model, then runs each pass it is
 * sent, in order, and hands the hook tensors back by transfer. On close it releases the session
 * and ends.
 */
const port = parentPort!;
const send = (m: FromModelThread, transfer: ArrayBuffer[] = []) => port.postMessage(m, transfer);

let model: ModelSession | undefined;
try {
  model = await openModelHere(workerData as SessionOptions);
  send({ type: "ready", dModel: model.dModel, vocabSize: model.vocabSize });
} catch (err) {
  send({ type: "failed", id: OPEN, error: wireError(err) });
  port.close();
}

// Passes run one after another, and close waits for those already sent.
let queue = Promise.resolve();
port.on("message", (m: ToModelThread) => {
  queue = queue.then(async () => {
    if (m.type === "close") {
      await model?.close();
      port.close();
      return;
    }
    try {
      const outputs = await model!.run(m.inputs);
      // Two hook points may share one tensor: each buffer is listed once.
      const buffers = new Set([...outputs.values()].map((o) => o.data.buffer as ArrayBuffer));
      send({ type: "outputs", id: m.id, outputs: [...outputs] }, [...buffers]);
    } catch (err) {
      send({ type: "failed", id: m.id, error: wireError(err) });
    }
  });
});
