import assert from "node:assert/strict";
import { test } from "node:test";
import { createClient } from "../../services/common/grpc/adapter.js";
import { BufferService, type PushResponse } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { HOOK, makeChunk, PushClient, startHarness } from "./support.js";

/**
 * One process that pulls from and pushes to the same buffer address (a bench, a test, a co-located
 * producer and trainer). grpc-js gives clients of one target one shared HTTP/2 connection, and on it
 * a Push stream with chunks in flight stopped the answers and the Batches beside it (seen: six
 * answers, then nothing until keepalive dropped the connection). The shared transport options give
 * each client its own connection.
 */
test("a producer and a trainer in one process, one buffer address: every row pushed is served", { timeout: 60_000 }, async () => {
  // The shape that stalled: 1.5 KiB rows, 1.5 MiB chunks with eight in flight, a 12 MiB pool, default windows.
  const d = 384;
  const h = await startHarness([`buffer.hookPoints=[{name: ${HOOK}, dModel: ${d}}]`, "buffer.capacityRows=8192"]);
  const batchClient = createClient(BufferService, h.running.address, h.config.transport);
  const pushClient = createClient(BufferService, h.running.address, h.config.transport);
  const push = new PushClient(pushClient);
  const chunks = 32;
  try {
    // The trainer's stream is open first, as in a pipeline.
    let rows = 0;
    const trainer = (async () => {
      for await (const b of batchClient.batches({ hookPoint: HOOK, trainerId: "t", batchSize: 1024 })) rows += b.activations!.shape[0]!;
    })();
    const answers: Array<Promise<PushResponse>> = [];
    for (let i = 0; i < chunks; i++) {
      if (i >= 8) await answers[i - 8];
      answers.push(
        push.send(makeChunk({ producerId: "p", producerNumber: 0, sequence: i, contexts: [i], rowsPerContext: 1024, dModel: d })),
      );
    }
    for (const a of answers) assert.equal((await a).rowsAccepted, 1024);
    await h.client.drain({}); // the rows under the mixing floor go out too
    await trainer;
    assert.equal(rows, chunks * 1024, "every row pushed was served");
  } finally {
    push.cancel();
    pushClient.close();
    batchClient.close();
    await h.close();
  }
});
