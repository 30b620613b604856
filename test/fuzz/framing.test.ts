import assert from "node:assert/strict";
import { type ClientHttp2Session, connect } from "node:http2";
import { gzipSync } from "node:zlib";
import { after, before, describe, it } from "node:test";
import { status } from "@grpc/grpc-js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { type Harness, hookStatus, startHarness } from "../buffer/support.js";
import { inParallel, MiB, pathOf, Rng, Tally } from "./support.js";

/**
 * Below protobuf: gRPC's own framing sent by hand over HTTP/2 (a 5-byte prefix per message: a
 * compressed flag and a length). Random flags, lengths and bodies, truncated frames, a length of
 * 4 GiB and gzip bombs are each answered with a gRPC status, and a bomb is never inflated.
 */

const FRAMES = 1000;

interface Reply {
  code: number | undefined;
  details: string;
}

/** One request with the given body and extra headers; resolves with the gRPC status, however it came. */
function send(session: ClientHttp2Session, path: string, body: Buffer, headers: Record<string, string> = {}): Promise<Reply> {
  return new Promise((resolve) => {
    const req = session.request({ ":method": "POST", ":path": path, "content-type": "application/grpc", te: "trailers", ...headers });
    const reply: Reply = { code: undefined, details: "" };
    const take = (h: Record<string, unknown>) => {
      if (h["grpc-status"] === undefined) return;
      reply.code = Number(h["grpc-status"]);
      reply.details = decodeURIComponent(String(h["grpc-message"] ?? ""));
    };
    req.on("response", take);
    req.on("trailers", take);
    req.on("data", () => undefined);
    req.on("error", () => undefined);
    req.on("close", () => resolve(reply));
    req.setTimeout(10_000, () => req.close());
    req.end(body);
  });
}

const frame = (flag: number, length: number, body: Uint8Array) => {
  const head = Buffer.alloc(5);
  head.writeUInt8(flag, 0);
  head.writeUInt32BE(length >>> 0, 1);
  return Buffer.concat([head, body]);
};

describe("fuzz: gRPC framing", () => {
  let h: Harness;
  let session: ClientHttp2Session;
  const rng = new Rng(1801);
  const tally = new Tally();

  before(async () => {
    h = await startHarness();
    session = connect(`http://${h.running.address}`);
  });
  after(async () => {
    session.close();
    for (const line of tally.lines()) console.log(`fuzz framing: ${line}`);
    await h.close();
  });

  it(`answers ${FRAMES} hand-made frames on Push, Batches and Status each with a status`, async () => {
    const paths = ["Push", "Batches", "Status"].map((m) => pathOf(BufferService, m));
    const cases = Array.from({ length: FRAMES }, () => {
      const body = rng.bytes(rng.int(64));
      const length = rng.pick([body.length, body.length + 1 + rng.int(100), rng.int(2 ** 32), 0]);
      const bytes = rng.next() < 0.1 ? Buffer.from(body.subarray(0, rng.int(5))) : frame(rng.pick([0, 0, 1, rng.int(256)]), length, body);
      return { path: rng.pick(paths), bytes };
    });
    await inParallel(cases, 16, async ({ path, bytes }) => {
      const reply = await send(session, path, bytes);
      assert.notEqual(reply.code, undefined, `no status for ${bytes.toString("hex").slice(0, 80)} on ${path}`);
      tally.add(path.split("/").pop()!, reply.code!);
    });
    const huge = await send(session, paths[2]!, frame(0, 2 ** 32 - 1, Buffer.alloc(16)));
    assert.equal(huge.code, status.RESOURCE_EXHAUSTED, huge.details);
    assert.equal((await hookStatus(h)).rowsIn, 0n, "no frame added a row");
  });

  it("refuses gzip and deflate requests before inflating them: 16 bombs of 250 MiB leave RSS within 64 MiB", async () => {
    const bomb = frame(1, 0, gzipSync(Buffer.alloc(250 * MiB)));
    bomb.writeUInt32BE(bomb.length - 5, 1);
    const before = process.memoryUsage().rss;
    let peak = before;
    const meter = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 2);
    const replies = await Promise.all(
      Array.from({ length: 16 }, (_, i) =>
        send(session, pathOf(BufferService, i % 2 ? "Push" : "Status"), bomb, { "grpc-encoding": i % 4 < 2 ? "gzip" : "deflate" }),
      ),
    );
    clearInterval(meter);
    for (const r of replies) {
      assert.equal(r.code, status.UNIMPLEMENTED, r.details);
      assert.match(r.details, /^grpc-encoding: "(gzip|deflate)" is refused/);
      tally.add("gzip bomb", r.code!);
    }
    const grew = (peak - before) / MiB;
    console.log(
      `fuzz framing: 16 gzip bombs of ${(bomb.length / 1024).toFixed(0)} KiB (250 MiB inflated): RSS peak +${grew.toFixed(1)} MiB`,
    );
    assert.ok(grew < 64, `RSS peaked ${grew.toFixed(0)} MiB above where it was`);
  });
});
