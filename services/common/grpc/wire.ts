import { type DescField, type DescMessage, fromBinary, type MessageShape, toBinary } from "@bufbuild/protobuf";

/**
 * Message (de)serialisation for grpc-js. protobuf-es' toBinary copies a bytes payload twice (into
 * its writer, then once per enclosing message on join); tensors are megabytes, so messages that reach
 * a bytes field through singular message fields are written as segments instead: the small fields
 * through toBinary, each payload as a view, and everything copied once into the buffer grpc-js takes.
 * grpc-js copies once more to frame it; that copy it forces.
 */

interface Plan {
  /** Singular bytes fields and singular message fields leading to one; written by hand. */
  heavy: DescField[];
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
    plan = { heavy: schema.fields.filter((f) => isHeavy(f, new Set([schema]))) };
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

/** Serialises a message into one Buffer, copying each bytes payload exactly once. */
export function encodeMessage<S extends DescMessage>(schema: S, message: MessageShape<S>): Buffer {
  const segments: Uint8Array[] = [];
  const total = encodeSegments(schema, message as unknown as Record<string, unknown>, segments);
  if (segments.length === 1) {
    const only = segments[0]!;
    return Buffer.from(only.buffer, only.byteOffset, only.byteLength);
  }
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
