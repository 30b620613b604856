import { type DescField, type DescMessage, fromBinary, type MessageShape, toBinary } from "@bufbuild/protobuf";

/**
 * Message (de)serialisation for grpc-js. protobuf-es' toBinary copies a bytes payload twice (into
 * its writer, then once per enclosing message on join); tensors are megabytes, so messages that reach
 * a bytes field through singular message fields are written as segments instead: the small fields
 * through toBinary, each payload as a view. A payload that ends the message and sits in a buffer
 * made by wireBuffer() is not copied at all: the fields before it are written into the room kept in
 * front of it, and the message is a view. Otherwise everything is copied once into the buffer grpc-js
 * takes. grpc-js copies once more to frame it; that copy it forces. A message with an `align` field
 * gets filler there so that its payload lands 8-byte aligned where grpc-js hands it to the receiver.
 */

/** Room kept in front of a wireBuffer's bytes, by ArrayBuffer. */
const headroom = new WeakMap<ArrayBufferLike, number>();

/** Payloads smaller than this are copied: the saving is not worth the bookkeeping. */
const ZERO_COPY_MIN_BYTES = 64 << 10;

/**
 * A buffer of `bytes` whose contents a message can be sent from without copying them: `room` bytes
 * are kept in front for the fields a message writes before its payload (ids included: give room for
 * them). The caller may reuse the buffer once the message is serialised.
 */
export function wireBuffer(bytes: number, room = 64 << 10): Buffer {
  const memory = new ArrayBuffer(room + bytes);
  headroom.set(memory, room);
  return Buffer.from(memory, room, bytes);
}

interface Plan {
  /** Singular bytes fields and singular message fields leading to one; written by hand. */
  heavy: DescField[];
  /** The message's `align` field, when it has one (see aligned()). */
  align: DescField | undefined;
}

const plans = new WeakMap<DescMessage, Plan>();

function leadsToBytes(message: DescMessage, seen: Set<DescMessage>): boolean {
  if (seen.has(message)) return false;
  seen.add(message);
  return message.fields.some((f) => isHeavy(f, seen));
}

function isHeavy(field: DescField, seen: Set<DescMessage>): boolean {
  if (field.oneof) return false;
  if (field.fieldKind === "scalar") return field.scalar === 12; // ScalarType.BYTES
  if (field.fieldKind === "message") return leadsToBytes(field.message, seen);
  return false;
}

function planFor(schema: DescMessage): Plan {
  let plan = plans.get(schema);
  if (!plan) {
    const align = alignFieldOf(schema);
    // The align filler goes in front of the payloads it aligns, never after them.
    plan = { heavy: schema.fields.filter((f) => f !== align && isHeavy(f, new Set([schema]))), align };
    plans.set(schema, plan);
  }
  return plan;
}

function varint(value: number, out: number[]): void {
  while (value > 0x7f) {
    out.push((value & 0x7f) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
}

/** Appends the message's encoding to `segments` and returns its length. */
function encodeSegments(schema: DescMessage, message: Record<string, unknown>, segments: Uint8Array[]): number {
  const { heavy } = planFor(schema);
  if (heavy.length === 0) {
    const bytes = toBinary(schema, message as MessageShape<DescMessage>);
    segments.push(bytes);
    return bytes.byteLength;
  }
  const light: Record<string, unknown> = { ...message };
  for (const f of heavy) light[f.localName] = f.fieldKind === "message" ? undefined : new Uint8Array(0);
  const head = toBinary(schema, light as MessageShape<DescMessage>);
  segments.push(head);
  let total = head.byteLength;
  for (const f of heavy) {
    const value = message[f.localName];
    if (value === undefined || value === null) continue;
    const tag: number[] = [];
    varint((f.number << 3) | 2, tag);
    if (f.fieldKind === "message") {
      const inner: Uint8Array[] = [];
      const length = encodeSegments(f.message, value as Record<string, unknown>, inner);
      varint(length, tag);
      segments.push(Uint8Array.from(tag), ...inner);
      total += tag.length + length;
    } else {
      const bytes = value as Uint8Array;
      if (bytes.byteLength === 0) continue;
      varint(bytes.byteLength, tag);
      segments.push(Uint8Array.from(tag), bytes);
      total += tag.length + bytes.byteLength;
    }
  }
  return total;
}

/** Bytes grpc-js puts in front of a message in the buffer it hands the receiver's deserialiser (flag and length). */
const FRAME_HEADER = 5;

/** A message's `align` field (bytes, numbered below 16 so its tag is one byte), when it has one. */
function alignFieldOf(schema: DescMessage): DescField | undefined {
  const f = schema.fields.find((x) => x.localName === "align");
  return f && f.fieldKind === "scalar" && f.scalar === 12 && f.number < 16 && !f.oneof ? f : undefined;
}

/**
 * The message's segments, with an `align` field (when the message has one) written after its small
 * fields and sized so that a payload that ends the message starts 8-byte aligned in the receiver's
 * buffer: the receiver then views the rows in place instead of copying them to an aligned array.
 * Protobuf readers take fields in any order, so the field goes in as a segment of its own.
 */
function aligned(schema: DescMessage, message: Record<string, unknown>, segments: Uint8Array[]): number {
  const { align } = planFor(schema);
  if (!align) return encodeSegments(schema, message, segments);
  // A filler the caller set is not written: this one replaces it.
  let total = encodeSegments(schema, { ...message, [align.localName]: new Uint8Array(0) }, segments);
  const payload = segments[segments.length - 1]!;
  if (segments.length === 1 || payload.byteLength < ZERO_COPY_MIN_BYTES) return total;
  const short = (8 - ((FRAME_HEADER + total - payload.byteLength) % 8)) % 8;
  if (short === 0) return total;
  // The field is a one-byte tag, a one-byte length and its filler: 2 to 9 bytes in all.
  const bytes = short < 2 ? short + 8 : short;
  const field = new Uint8Array(bytes);
  field[0] = (align.number << 3) | 2;
  field[1] = bytes - 2;
  segments.splice(1, 0, field);
  total += bytes;
  return total;
}

/** Serialises a message into one Buffer, copying each bytes payload at most once. */
export function encodeMessage<S extends DescMessage>(schema: S, message: MessageShape<S>): Buffer {
  const segments: Uint8Array[] = [];
  const total = aligned(schema, message as unknown as Record<string, unknown>, segments);
  if (segments.length === 1) {
    const only = segments[0]!;
    return Buffer.from(only.buffer, only.byteOffset, only.byteLength);
  }
  return inPlace(segments, total) ?? joined(segments, total);
}

/** The message as a view ending with its payload, the fields before it written into the payload's headroom; undefined when there is no room. */
function inPlace(segments: Uint8Array[], total: number): Buffer | undefined {
  const payload = segments[segments.length - 1]!;
  const room = headroom.get(payload.buffer);
  const head = total - payload.byteLength;
  if (room === undefined || payload.byteLength < ZERO_COPY_MIN_BYTES || payload.byteOffset > room || payload.byteOffset < head)
    return undefined;
  const out = Buffer.from(payload.buffer, payload.byteOffset - head, total);
  let offset = 0;
  for (const s of segments.slice(0, -1)) {
    out.set(s, offset);
    offset += s.byteLength;
  }
  return out;
}

function joined(segments: Uint8Array[], total: number): Buffer {
  const out = Buffer.allocUnsafe(total);
  let offset = 0;
  for (const s of segments) {
    out.set(s, offset);
    offset += s.byteLength;
  }
  return out;
}

/** Parses a message; bytes fields are views into `buffer`, not copies. */
export function decodeMessage<S extends DescMessage>(schema: S, buffer: Uint8Array): MessageShape<S> {
  return fromBinary(schema, buffer);
}
