import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { createClient, type HandlerContext, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { Signal } from "../../services/common/signal.js";
import { fromTensor, toTensor } from "../../services/common/tensor-codec.js";
import {
  BatchesResponseSchema,
  BufferService,
  PushResponseSchema,
  type BatchesRequest,
  type PushRequest,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

/**
 * What the adapter promises connect-style handlers, checked on a real server on loopback: the next
 * request is read only when the handler pulls it, an output stream is resumed only once its last
 * message is serialised (so its memory may be reused) and only as fast as the peer reads, and a
 * cancelled call aborts `ctx.signal` and runs the handler's `finally`.
 */
const transport = { ...RunConfigSchema.parse({}).transport, maxMessageBytes: 8 << 20, flowControlWindowBytes: 1 << 20 };
const D = 1024;
const ROWS = 256; // 1 MiB per message

describe("connect-style handlers", () => {
  let server: RunningServer;
  let client: ServiceClient<typeof BufferService>;
  /** How many messages the streaming handler has produced, and whether its finally ran. */
  let produced = 0;
  let finalized = false;
  let lastSignal: AbortSignal | undefined;
  const progress = new Signal();
  /** Requests the bidi handler has pulled so far. */
  let pulled = 0;
  const release = new Signal();
  let released = false;

  before(async () => {
    server = await startServer("127.0.0.1:0", transport, [
      bind(BufferService, {
        push: async function* (requests: AsyncIterable<PushRequest>) {
          for await (const req of requests) {
            pulled++;
            progress.notify();
            await release.until(() => released);
            if (req.chunk?.producerId === "bad") throw new FieldError("chunk.producer_id", "refused on purpose");
            yield create(PushResponseSchema, { sequence: req.chunk?.sequence ?? 0n, rowsAccepted: 1 });
          }
        },
        batches: async function* (req: BatchesRequest, ctx: HandlerContext) {
          lastSignal = ctx.signal;
          finalized = false;
          produced = 0;
          // One buffer for every message, overwritten after each yield: safe only if the adapter
          // resumes the generator after the previous message was serialised.
          const values = new Float32Array(ROWS * D);
          try {
            for (let i = 0; req.maxBatches === 0n || i < req.maxBatches; i++) {
              values.fill(i);
              produced++;
              progress.notify();
              yield create(BatchesResponseSchema, { sequence: BigInt(i), activations: toTensor(values, DType.FP32, [ROWS, D]) });
            }
          } finally {
            finalized = true;
            progress.notify();
          }
        },
        status: async () => ({}),
        pause: async () => ({}),
        resume: async () => ({}),
        drain: async () => ({}),
      }),
    ]);
    client = createClient(BufferService, server.address, transport);
  });
  after(async () => {
    client.close();
    await server.close(0);
  });

  it("resumes an output stream only after its message is serialised: a reused buffer arrives intact", async () => {
    const got: number[] = [];
    for await (const b of client.batches({ maxBatches: 20n })) {
      const values = fromTensor(b.activations!);
      assert.equal(values[0], values[values.length - 1], "a message was changed while it was being serialised");
      got.push(values[0]!);
    }
    assert.deepEqual(
      got,
      Array.from({ length: 20 }, (_, i) => i),
    );
    assert.equal(finalized, true);
  });

  it("holds a stream's handler back while the peer does not read, and lets it go on when it does", async () => {
    const stream = client.batches({ maxBatches: 400n });
    let received = 0;
    // A trainer that took one batch and then stops reading (busy with a long step).
    stream.on("data", () => {
      received++;
      if (received === 1) stream.pause();
    });
    const ended = new Promise<void>((resolve, reject) => {
      stream.on("end", resolve);
      stream.on("error", reject);
    });
    // Flow control (1 MiB windows) and the client's read-ahead hold a bounded number of 1 MiB messages.
    let seen = -1;
    while (seen !== produced) {
      seen = produced;
      await progress.wait(undefined, 500);
    }
    assert.ok(produced < 100, `the handler ran ahead of a peer that reads nothing: ${produced} messages produced`);
    assert.equal(received, 1);
    stream.resume();
    await ended;
    assert.equal(received, 400);
  });

  it("aborts ctx.signal and runs the handler's finally when the peer cancels", async () => {
    const stream = client.batches({ maxBatches: 0n });
    stream.on("data", () => undefined);
    stream.on("error", () => undefined);
    await progress.until(() => produced >= 3);
    stream.cancel();
    assert.ok(await progress.until(() => finalized), "the generator's finally ran");
    assert.equal(lastSignal?.aborted, true);
  });

  it("reads the next request only when the handler pulls it, and a thrown FieldError ends the stream with its status", async () => {
    released = false;
    pulled = 0;
    const call = client.push();
    const answers: bigint[] = [];
    const ended = new Promise<{ code: number; details: string }>((resolve) => {
      call.on("data", (r: { sequence: bigint }) => answers.push(r.sequence));
      call.on("error", (err: { code: number; details: string }) => resolve(err));
    });
    for (let i = 0; i < 5; i++) call.write(create(BufferService.method.push.input, { chunk: { sequence: BigInt(i), producerId: "p" } }));
    call.write(create(BufferService.method.push.input, { chunk: { sequence: 5n, producerId: "bad" } }));
    await progress.until(() => pulled >= 1);
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(pulled, 1, "a handler that has not finished its request is not handed the next one");
    released = true;
    release.notify();
    const err = await ended;
    assert.deepEqual(answers, [0n, 1n, 2n, 3n, 4n], "answers before the failure arrive, in order");
    assert.equal(err.code, status.INVALID_ARGUMENT);
    assert.equal(err.details, "chunk.producer_id: refused on purpose");
  });

  it("ends a stream at its deadline, aborting the handler", async () => {
    const stream = client.batches({ maxBatches: 0n }, { deadline: Date.now() + 300 });
    stream.on("data", () => undefined);
    const err = await new Promise<{ code: number }>((resolve) => stream.on("error", resolve));
    assert.equal(err.code, status.DEADLINE_EXCEEDED);
    assert.ok(await progress.until(() => finalized));
  });
});
