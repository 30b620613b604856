import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { create, toBinary } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { malformedError } from "../../services/common/grpc/malformed.js";
import { checkTensor } from "../../services/common/tensor-codec.js";
import { FieldError } from "../../services/common/errors.js";
import { BatchesRequestSchema, PushRequestSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";
import { varint } from "./support.js";

/** The locator that names the field of a request that does not parse, and the codec's shape checks, case by case. */
describe("naming what is wrong with a request", () => {
  const chunk = toBinary(
    PushRequestSchema,
    create(PushRequestSchema, {
      chunk: {
        runId: "test",
        hookPoint: "blocks.1.hook_resid_post",
        producerId: "p",
        sequence: 300n,
        activations: { dtype: DType.FP32, shape: [64, 16], data: new Uint8Array(16) },
      },
    }),
  );
  const named = (bytes: Uint8Array) => malformedError(PushRequestSchema, bytes, "protobuf-es's words").message;

  it("names the deepest field a message cut short cuts through", () => {
    assert.equal(named(chunk.subarray(0, 1)), "chunk: malformed PushRequest: truncated varint at byte 1");
    assert.equal(
      named(chunk.subarray(0, 10)),
      "chunk.hook_point: malformed PushRequest: length 24 at byte 9 runs past the end (0 bytes left)",
    );
    assert.equal(named(chunk.subarray(0, 38)), "chunk.sequence: malformed PushRequest: truncated varint at byte 38");
    assert.equal(
      named(chunk.subarray(0, 46)),
      "chunk.activations.shape: malformed PushRequest: length 2 at byte 45 runs past the end (0 bytes left)",
    );
    assert.equal(
      named(chunk.subarray(0, 50)),
      "chunk.activations.data: malformed PushRequest: length 16 at byte 49 runs past the end (0 bytes left)",
    );
  });

  it("names a field sent under a wrong wire type, an invalid wire type, field 0 and an unknown field cut short", () => {
    const wrong = Uint8Array.from([...varint((4 << 3) | 2), 1, 0]);
    assert.equal(
      malformedError(BatchesRequestSchema, wrong, "").message,
      "batch_size: malformed BatchesRequest: wire type 2 (length-delimited), expected 0 (varint)",
    );
    assert.equal(
      malformedError(BatchesRequestSchema, Uint8Array.from([(2 << 3) | 7]), "").message,
      "trainer_id: malformed BatchesRequest: invalid wire type 7 at byte 0",
    );
    assert.equal(
      malformedError(BatchesRequestSchema, Uint8Array.from([0, 0]), "").message,
      "request: malformed BatchesRequest: field number 0 at byte 0 (no field has it)",
    );
    assert.equal(
      malformedError(BatchesRequestSchema, Uint8Array.from([...varint((99 << 3) | 1), 1, 2]), "").message,
      "field 99 (unknown): malformed BatchesRequest: 8-byte value at byte 2 runs past the end (2 bytes left)",
    );
    const badText = Uint8Array.from([(1 << 3) | 2, 2, 0xff, 0xfe]);
    const err = malformedError(BatchesRequestSchema, badText, "");
    assert.ok(err instanceof FieldError);
    assert.deepEqual(
      [err.field, err.rawMessage, err.code],
      ["hook_point", "malformed BatchesRequest: not valid UTF-8", status.INVALID_ARGUMENT],
    );
  });

  it("refuses a shape whose product passes 2^53 before comparing it with the payload", () => {
    const tensor = {
      $typeName: "saeflow.v1.Tensor" as const,
      dtype: DType.FP32,
      shape: [2 ** 32 - 1, 2 ** 32 - 1, 2 ** 32 - 1],
      data: new Uint8Array(10),
    };
    assert.throws(
      () => checkTensor(tensor, "t"),
      (e: FieldError) => e.field === "t.shape" && /past 2\^53 bytes; the payload holds 10$/.test(e.rawMessage),
    );
    assert.throws(
      () => checkTensor({ ...tensor, shape: new Array<number>(9).fill(1) }, "t"),
      (e: FieldError) => e.field === "t.shape" && e.rawMessage === "rank 9; at most 8 dimensions",
    );
  });
});
