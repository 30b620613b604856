import { type DescField, type DescMessage, ScalarType } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { FieldError } from "../errors.js";

/**
 * Where a message that does not parse goes wrong. protobuf-es says only "premature EOF" or "illegal
 * tag: field no 0 wire type 1", and grpc-js answers a request it cannot parse with a bare INTERNAL;
 * this walks the wire format along the schema to name the field (by its .proto path, as FieldErrors
 * do) and what is wrong with it. It runs only once parsing has failed.
 */

const VARINT = 0;
const I64 = 1;
const LEN = 2;
const I32 = 5;
const WIRE_NAMES = ["varint", "64-bit", "length-delimited", "group start", "group end", "32-bit", "invalid (6)", "invalid (7)"];
const utf8 = new TextDecoder("utf-8", { fatal: true });

/** A walk that stopped at a problem. */
class Stop extends Error {
  constructor(
    readonly field: string,
    readonly problem: string,
  ) {
    super(problem);
  }
}

function scalarWireType(scalar: ScalarType): number {
  switch (scalar) {
    case ScalarType.DOUBLE:
    case ScalarType.FIXED64:
    case ScalarType.SFIXED64:
      return I64;
    case ScalarType.FLOAT:
    case ScalarType.FIXED32:
    case ScalarType.SFIXED32:
      return I32;
    case ScalarType.STRING:
    case ScalarType.BYTES:
      return LEN;
    default:
      return VARINT;
  }
}

/** Wire types a field may arrive in: repeated numbers come packed (LEN) or one by one. */
function expectedWireTypes(field: DescField): number[] {
  switch (field.fieldKind) {
    case "scalar":
      return [scalarWireType(field.scalar)];
    case "enum":
      return [VARINT];
    case "list":
      if (field.listKind === "scalar" && field.scalar !== ScalarType.STRING && field.scalar !== ScalarType.BYTES)
        return [LEN, scalarWireType(field.scalar)];
      return field.listKind === "enum" ? [LEN, VARINT] : [LEN];
    default:
      return [LEN];
  }
}

class Walker {
  constructor(private readonly bytes: Uint8Array) {}

  /** Reads a varint at `at`; returns [value, next offset]. */
  varint(at: number, end: number, field: string): [number, number] {
    let value = 0;
    for (let i = 0; i < 10; i++) {
      if (at + i >= end) throw new Stop(field, `truncated varint at byte ${at}`);
      const b = this.bytes[at + i]!;
      value += (b & 0x7f) * 2 ** (7 * i);
      if (!(b & 0x80)) return [value, at + i + 1];
    }
    throw new Stop(field, `varint at byte ${at} is longer than 10 bytes`);
  }

  /** Walks the fields of `schema` in [at, end); throws Stop at the first problem. */
  message(schema: DescMessage | undefined, at: number, end: number, path: string): void {
    while (at < end) {
      const [tag, next] = this.varint(at, end, path || "request");
      const number = Math.floor(tag / 8);
      const wire = tag % 8;
      const field = schema?.fields.find((f) => f.number === number);
      const name = field ? (path ? `${path}.${field.name}` : field.name) : `${path ? `${path}.` : ""}field ${number} (unknown)`;
      if (number === 0) throw new Stop(path || "request", `field number 0 at byte ${at} (no field has it)`);
      if (wire > 5) throw new Stop(name, `invalid wire type ${wire} at byte ${at}`);
      if (field && !expectedWireTypes(field).includes(wire)) {
        const expected = expectedWireTypes(field).map((w) => `${w} (${WIRE_NAMES[w]})`);
        throw new Stop(name, `wire type ${wire} (${WIRE_NAMES[wire]}), expected ${expected.join(" or ")}`);
      }
      at = this.value(field, wire, next, end, name);
    }
  }

  /** Walks one field's value; returns the offset after it. */
  private value(field: DescField | undefined, wire: number, at: number, end: number, name: string): number {
    switch (wire) {
      case VARINT:
        return this.varint(at, end, name)[1];
      case I64:
      case I32: {
        const width = wire === I64 ? 8 : 4;
        if (at + width > end) throw new Stop(name, `${width}-byte value at byte ${at} runs past the end (${end - at} bytes left)`);
        return at + width;
      }
      case LEN: {
        const [length, from] = this.varint(at, end, name);
        if (from + length > end) {
          // A message cut short: the deepest field it cuts through names the problem best.
          if (field?.fieldKind === "message" || (field?.fieldKind === "list" && field.listKind === "message")) {
            this.message(field.message, from, end, name);
          }
          throw new Stop(name, `length ${length} at byte ${at} runs past the end (${end - from} bytes left)`);
        }
        this.inside(field, from, from + length, name);
        return from + length;
      }
      default:
        // Groups are proto2's; this contract has none, and protobuf-es refuses an unmatched end.
        throw new Stop(name, `wire type ${wire} (${WIRE_NAMES[wire]}) at byte ${at}: groups are not part of this contract`);
    }
  }

  /** Checks a length-delimited value: a message's fields, a string's UTF-8, a packed list's numbers. */
  private inside(field: DescField | undefined, at: number, end: number, name: string): void {
    if (!field) return;
    const kind = field.fieldKind === "list" ? field.listKind : field.fieldKind;
    if (kind === "message" && (field.fieldKind === "message" || field.fieldKind === "list")) {
      this.message(field.message, at, end, name);
      return;
    }
    const scalar = field.fieldKind === "scalar" || (field.fieldKind === "list" && field.listKind === "scalar") ? field.scalar : undefined;
    if (scalar === ScalarType.STRING) {
      try {
        utf8.decode(this.bytes.subarray(at, end));
      } catch {
        throw new Stop(name, "not valid UTF-8");
      }
      return;
    }
    if (field.fieldKind === "list" && scalar !== ScalarType.BYTES) {
      const wire = kind === "enum" ? VARINT : scalarWireType(scalar!);
      while (at < end) at = this.value(undefined, wire, at, end, name);
    }
  }
}

/**
 * The FieldError for bytes of `schema` that protobuf-es could not parse (`parseError` its message):
 * INVALID_ARGUMENT naming the field where the walk found the problem, or "request" when it found none.
 */
export function malformedError(schema: DescMessage, bytes: Uint8Array, parseError: string): FieldError {
  try {
    new Walker(bytes).message(schema, 0, bytes.length, "");
  } catch (err) {
    if (err instanceof Stop) return new FieldError(err.field, `malformed ${schema.name}: ${err.problem}`, status.INVALID_ARGUMENT);
    throw err;
  }
  return new FieldError("request", `malformed ${schema.name}: ${parseError}`, status.INVALID_ARGUMENT);
}

/** What grpc-js hands a handler in place of a request that did not parse; the adapter answers it with `error`. */
export class MalformedRequest {
  constructor(readonly error: FieldError) {}
}

/** Parses a request, or returns a MalformedRequest naming the field where it goes wrong (grpc-js would say INTERNAL). */
export function decodeRequest<T>(schema: DescMessage, bytes: Uint8Array, decode: () => T): T | MalformedRequest {
  try {
    return decode();
  } catch (err) {
    return new MalformedRequest(malformedError(schema, bytes, (err as Error).message));
  }
}
