import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { decodeMessage, encodeMessage, wireBuffer } from "../../services/common/grpc/wire.js";
import { fromTensor, toTensor } from "../../services/common/tensor-codec.js";
import { BatchesResponseSchema, PushRequestSchema, StatusResponseSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType, type Tensor } from "../../services/gen/saeflow/v1/tensor_pb.js";

describe("gRPC wire encoding", () => {
  it("writes tensor-carrying messages that protobuf-es parses back identically", () => {
    const values = Float32Array.from({ length: 6 * 5 }, (_, i) => i * 0.25 - 3);
    const msg = create(PushRequestSchema, {
      chunk: {
        runId: "r",
        hookPoint: "blocks.0.hook_resid_post",
        producerId: "p",
        sequence: 2n ** 40n,
        activations: toTensor(values, DType.FP32, [6, 5]),
        tokenIds: [1, 2, 3, 4, 5, 6],
        contextIds: [0, 0, 0, 1, 1, 1],
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
      },
    });
    const bytes = encodeMessage(PushRequestSchema, msg);
    assert.equal(bytes.byteLength, toBinary(PushRequestSchema, msg).byteLength);
    // A plain Uint8Array copy, so bytes fields come back as Uint8Array rather than Buffer views.
    const back = fromBinary(PushRequestSchema, new Uint8Array(bytes));
    assert.deepEqual(back, msg);
  });

  it("hands payloads back as views into the received buffer", () => {
    const msg = create(PushRequestSchema, { chunk: { activations: toTensor(new Float32Array(64).fill(7), DType.FP32, [8, 8]) } });
    const bytes = encodeMessage(PushRequestSchema, msg);
    const back = decodeMessage(PushRequestSchema, bytes);
    assert.equal(back.chunk!.activations!.data.buffer, bytes.buffer);
  });

  it("encodes messages without payloads exactly as protobuf-es does", () => {
    const msg = create(StatusResponseSchema, { runId: "x", producers: ["a", "b"], hookPoints: [{ hookPoint: "h", capacityRows: 10n }] });
    assert.deepEqual(new Uint8Array(encodeMessage(StatusResponseSchema, msg)), toBinary(StatusResponseSchema, msg));
  });

  it("sends a payload from a wireBuffer in place: the message is a view over it that protobuf-es parses back identically", () => {
    const rows = 512;
    const out = wireBuffer(rows * 64 * 4, 16 << 10);
    const values = new Float32Array(out.buffer, out.byteOffset, rows * 64);
    values.forEach((_, i) => (values[i] = i % 97));
    const ids = Array.from({ length: rows }, (_, i) => 100_000 + i);
    const msg = create(PushRequestSchema, {
      chunk: {
        runId: "r",
        hookPoint: "h",
        producerId: "p",
        sequence: 9n,
        activations: toTensor(values, DType.FP32, [rows, 64]),
        tokenIds: ids,
        contextIds: ids,
      },
    });
    const bytes = encodeMessage(PushRequestSchema, msg);
    assert.equal(bytes.buffer, out.buffer, "no copy of the payload");
    assert.equal(bytes.byteOffset + bytes.byteLength, out.byteOffset + out.byteLength, "the message ends with the payload");
    // Besides the filler that aligns the payload (next test), protobuf-es' own encoding.
    const back = fromBinary(PushRequestSchema, new Uint8Array(bytes));
    assert.equal(bytes.byteLength, toBinary(PushRequestSchema, msg).byteLength + 2 + back.align.byteLength);
    assert.deepEqual({ ...back, align: new Uint8Array(0) }, msg);
    // Fields that do not fit in the room kept in front are copied out as before.
    const many = Array.from({ length: 20_000 }, (_, i) => i);
    const big = create(PushRequestSchema, {
      chunk: { activations: toTensor(values, DType.FP32, [rows, 64]), tokenIds: many, contextIds: many },
    });
    const copied = encodeMessage(PushRequestSchema, big);
    assert.notEqual(copied.buffer, out.buffer);
    assert.deepEqual({ ...fromBinary(PushRequestSchema, new Uint8Array(copied)), align: new Uint8Array(0) }, big);
  });

  it("pads a message with an align field so that its payload starts 8-byte aligned behind gRPC's 5-byte frame header", () => {
    const values = new Float32Array(64 << 10);
    // Every length of the fields in front of the payload modulo 8, through the run id's length.
    for (let extra = 0; extra < 16; extra++) {
      for (const [schema, msg] of [
        [
          PushRequestSchema,
          create(PushRequestSchema, { chunk: { runId: "r".repeat(extra), activations: toTensor(values, DType.FP32, [1024, 64]) } }),
        ],
        [
          BatchesResponseSchema,
          create(BatchesResponseSchema, { traceparent: "t".repeat(extra), activations: toTensor(values, DType.FP32, [1024, 64]) }),
        ],
      ] as const) {
        const bytes = encodeMessage(schema as typeof PushRequestSchema, msg as never);
        // As grpc-js hands a received message over: a fresh buffer holding the 5-byte header, then the message.
        const framed = Buffer.alloc(5 + bytes.byteLength);
        bytes.copy(framed, 5);
        const received = decodeMessage(schema as typeof PushRequestSchema, framed.subarray(5)) as {
          activations?: Tensor;
          chunk?: { activations?: Tensor };
        };
        const tensor = received.activations ?? received.chunk!.activations!;
        assert.equal(tensor.data.byteOffset % 8, 0, `${schema.typeName}, ${extra} bytes more in front`);
        assert.deepEqual(Array.from(fromTensor(tensor).subarray(0, 4)), [0, 0, 0, 0]);
      }
    }
  });

  it("leaves empty payloads out", () => {
    const msg = create(PushRequestSchema, { chunk: { runId: "r", activations: { dtype: DType.FP32, shape: [0, 4] } } });
    assert.deepEqual(fromBinary(PushRequestSchema, new Uint8Array(encodeMessage(PushRequestSchema, msg))), msg);
  });
});
