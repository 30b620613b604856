import { startWorker, unwireError, type WireError } from "../common/worker.js";
import { type ForwardInputs, type HookOutput, type ModelSession, openModelHere, type SessionOptions } from "./session.js";

export type ToModelThread = { type: "run"; id: number; inputs: ForwardInputs } | { type: "close" };
export type FromModelThread =
  | { type: "ready"; dModel: number; vocabSize: number | undefined }
  | { type: "outputs"; id: number; outputs: Array<[string, HookOutput]> }
  /** id is OPEN when the model could not be opened. */
  | { type: "failed"; id: number; error: WireError };

export const OPEN = -1;

interface Pending {
  resolve: (outputs: Map<string, HookOutput>) => void;
  reject: (err: Error) => void;
}

/**
 * Opens the producer's model. onnxruntime-node runs a session on the thread that calls it and
 * returns only when the pass is done, so that thread does nothing else meanwhile.
 *
 * On a GPU provider the pass runs on a thread of its own (model-worker.ts): the calling thread only
 * waits for the device there, and the producer's thread converts and pushes the previous pass,
 * hears the buffer's answers, NATS and control RPCs meanwhile. Hook tensors come back transferred,
 * not copied.
 *
 * On the CPU provider the pass runs on the producer's thread, which onnxruntime counts as one of
 * its intra-op threads: the pool fills the cores, and a push beside it only competes with it
 * (measured on 2 cores: a thread of its own made the producer 9 to 33% slower). The push then
 * waits for the pass, and a pass longer than the gRPC keepalive timeout can get the connection
 * closed under it (produce.ts warns).
 *
 * Fails as openModelHere does, naming the key at fault.
 */
export function openModelSession(options: SessionOptions): Promise<ModelSession> {
  return options.provider === "cpu" ? openModelHere(options) : openModelThread(options);
}

function openModelThread(options: SessionOptions): Promise<ModelSession> {
  const worker = startWorker(import.meta.url, "model-worker", options);
  const pending = new Map<number, Pending>();
  let nextId = 0;
  let gone: Error | undefined;
  let closing = false;
  return new Promise<ModelSession>((resolveOpen, rejectOpen) => {
    const end = (err: Error) => {
      gone ??= err;
      rejectOpen(err);
      for (const p of pending.values()) p.reject(err);
      pending.clear();
    };
    const exited = new Promise<void>((resolve) =>
      worker.once("exit", (code) => {
        end(new Error(closing ? "the model is closed" : `the model thread exited unexpectedly (code ${code})`));
        resolve();
      }),
    );
    worker.on("error", end);
    worker.on("message", (m: FromModelThread) => {
      if (m.type === "ready") {
        resolveOpen({
          dModel: m.dModel,
          vocabSize: m.vocabSize,
          ownThread: true,
          run: (inputs) =>
            new Promise((resolve, reject) => {
              if (gone) return reject(gone);
              const id = nextId++;
              pending.set(id, { resolve, reject });
              worker.postMessage({ type: "run", id, inputs } satisfies ToModelThread);
            }),
          close: async () => {
            closing = true;
            worker.postMessage({ type: "close" } satisfies ToModelThread);
            await exited;
          },
        });
        return;
      }
      if (m.type === "failed" && m.id === OPEN) {
        closing = true;
        rejectOpen(unwireError(m.error));
        return;
      }
      const waiting = pending.get(m.id);
      pending.delete(m.id);
      if (m.type === "outputs") waiting?.resolve(new Map(m.outputs));
      else waiting?.reject(unwireError(m.error));
    });
  });
}
