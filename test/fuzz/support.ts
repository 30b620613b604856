import assert from "node:assert/strict";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { create, type DescMessage, type DescService, fromBinary, type MessageInitShape, toBinary } from "@bufbuild/protobuf";
import { Client, type ClientDuplexStream, credentials, Metadata, type ServiceError, status } from "@grpc/grpc-js";

/**
 * The fuzzer's tools: a seeded generator, a raw client that sends bytes as they are (identity
 * (de)serialisers on the method path, so nothing on this side parses or checks them), malformed
 * encodings of a schema's messages, and an RSS meter.
 */

/** mulberry32: a small seeded generator, so a failing case can be replayed. */
export class Rng {
  constructor(private state: number) {}

  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) | 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)]!;
  }

  bytes(n: number): Uint8Array {
    return Uint8Array.from({ length: n }, () => this.int(256));
  }
}

export const MiB = 1 << 20;
/** A 1 MiB string, for every string field. */
export const HUGE = "x".repeat(MiB);

/** What a call was answered with: a status, and for a stream the messages before it. */
export interface Answer {
  code: status;
  details: string;
  messages: Buffer[];
}

const identity = (b: Buffer) => b;

/** A grpc-js client that sends raw bytes on any method path. */
export class RawClient {
  readonly client: Client;

  constructor(address: string) {
    this.client = new Client(address, credentials.createInsecure(), { "grpc.max_receive_message_length": 64 * MiB });
  }

  unary(path: string, bytes: Uint8Array, deadlineMs = 10_000): Promise<Answer> {
    return new Promise((resolve) => {
      this.client.makeUnaryRequest(
        path,
        identity,
        identity,
        Buffer.from(bytes),
        new Metadata(),
        { deadline: Date.now() + deadlineMs },
        (err: ServiceError | null, res?: Buffer) =>
          resolve(err ? { code: err.code, details: err.details, messages: [] } : { code: status.OK, details: "", messages: [res!] }),
      );
    });
  }

  /** A server stream: the messages until `stopAfter` of them came (then cancels), and the status. */
  serverStream(path: string, bytes: Uint8Array, stopAfter = Infinity, deadlineMs = 10_000): Promise<Answer> {
    return new Promise((resolve) => {
      const call = this.client.makeServerStreamRequest(path, identity, identity, Buffer.from(bytes), new Metadata(), {
        deadline: Date.now() + deadlineMs,
      });
      const messages: Buffer[] = [];
      call.on("data", (m: Buffer) => {
        messages.push(m);
        if (messages.length >= stopAfter) call.cancel();
      });
      call.on("error", (err: ServiceError) => resolve({ code: err.code, details: err.details, messages }));
      call.on("status", (s: { code: status; details: string }) => {
        if (s.code === status.OK) resolve({ code: s.code, details: s.details, messages });
      });
    });
  }

  /** A bidi stream: writes each message, half-closes, and collects the answers and the status. */
  bidi(path: string, requests: Uint8Array[], deadlineMs = 20_000): Promise<Answer> {
    return new Promise((resolve) => {
      const call: ClientDuplexStream<Buffer, Buffer> = this.client.makeBidiStreamRequest(path, identity, identity, new Metadata(), {
        deadline: Date.now() + deadlineMs,
      });
      const messages: Buffer[] = [];
      call.on("data", (m: Buffer) => messages.push(m));
      call.on("error", (err: ServiceError) => resolve({ code: err.code, details: err.details, messages }));
      call.on("status", (s: { code: status; details: string }) => {
        if (s.code === status.OK) resolve({ code: s.code, details: s.details, messages });
      });
      for (const r of requests) call.write(Buffer.from(r));
      call.end();
    });
  }

  close(): void {
    this.client.close();
  }
}

/** Runs `work` over `items`, `width` at a time. */
export async function inParallel<T>(items: readonly T[], width: number, work: (item: T, index: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(width, items.length) }, async () => {
      while (next < items.length) {
        const i = next++;
        await work(items[i]!, i);
      }
    }),
  );
}

/** True when `bytes` parse as `schema` (protobuf-es is the judge of what is well-formed). */
export function parses(schema: DescMessage, bytes: Uint8Array): boolean {
  try {
    fromBinary(schema, bytes);
    return true;
  } catch {
    return false;
  }
}

/** A varint's bytes. */
export function varint(value: number): number[] {
  const out: number[] = [];
  while (value > 0x7f) {
    out.push((value & 0x7f) | 0x80);
    value = Math.floor(value / 128);
  }
  out.push(value);
  return out;
}

/** A malformed encoding and the field its status must name (undefined: any field, or "request"). */
export interface Malformed {
  kind: string;
  bytes: Uint8Array;
  field?: string;
}

const WIRE: Record<string, number> = { varint: 0, i64: 1, len: 2, i32: 5 };

/**
 * `count` encodings of `schema` that do not parse: random bytes, a valid message cut short, a tag
 * whose varint never ends, each known field under a wrong wire type, a length past the end, wire
 * types 6 and 7, field number 0. Only bytes protobuf-es refuses are kept.
 */
export function malformed<S extends DescMessage>(schema: S, valid: MessageInitShape<S>, count: number, rng: Rng): Malformed[] {
  const whole = toBinary(schema, create(schema, valid));
  const out: Malformed[] = [];
  const fields = schema.fields;
  // An empty request (Status, Pause, ...) has no fields: its tags go to unknown field numbers.
  const number = () => (fields.length ? rng.pick(fields).number : 1 + rng.int(100));
  const makers: Array<() => Malformed> = [
    () => ({ kind: "random bytes", bytes: rng.bytes(1 + rng.int(rng.next() < 0.1 ? 4096 : 48)) }),
    () => ({ kind: "truncated message", bytes: whole.subarray(0, Math.max(1, rng.int(whole.length))) }),
    () => ({ kind: "truncated varint", bytes: Uint8Array.from([...varint((number() << 3) | 0), 0xff, 0xff]) }),
    () => ({
      kind: "length past the end",
      bytes: Uint8Array.from([...varint((number() << 3) | 2), ...varint(1000 + rng.int(1 << 30)), 1, 2]),
    }),
    () => ({ kind: "wire type 6 or 7", bytes: Uint8Array.from(varint((number() << 3) | (6 + rng.int(2)))) }),
    () => ({ kind: "field number 0", bytes: Uint8Array.from([rng.pick([0, 1, 2, 5]), 0, 0, 0, 0, 0, 0, 0, 0]) }),
  ];
  if (fields.length) {
    makers.push(() => {
      const f = rng.pick(fields);
      const lengthy = f.fieldKind === "message" || (f.fieldKind === "scalar" && (f.scalar === 9 || f.scalar === 12));
      const wrong = lengthy ? WIRE.i32! : WIRE.i64!;
      return {
        kind: "wrong wire type",
        bytes: Uint8Array.from([...varint((f.number << 3) | wrong), 1, 2, 3, 4, 5, 6, 7, 8]),
        field: f.name,
      };
    });
  }
  for (let tries = 0; out.length < count; tries++) {
    if (tries > count * 100) throw new Error(`malformed(${schema.typeName}): could not make ${count} encodings that do not parse`);
    const m = makers[tries % makers.length]!();
    if (!parses(schema, m.bytes)) out.push(m);
  }
  return out;
}

/** The status's details name a field: "<path>: ..." with a .proto path, an unknown field's number, or "request". */
export function namesAField(details: string, field?: string): boolean {
  const m = /^((?:[a-z_][a-z0-9_]*)(?:\.[a-z_][a-z0-9_]*)*(?:\.field \d+ \(unknown\))?|field \d+ \(unknown\)): /.exec(details);
  if (!m) return false;
  return field === undefined || m[1] === field || m[1]!.endsWith(`.${field}`);
}

/** Asserts an answer is INVALID_ARGUMENT naming a field, for a request that does not parse. */
export function assertMalformedAnswer(answer: Answer, m: Malformed, rpc: string): void {
  assert.equal(answer.code, status.INVALID_ARGUMENT, `${rpc} ${m.kind}: ${status[answer.code]} ${answer.details}`);
  assert.ok(
    namesAField(answer.details, m.field),
    `${rpc} ${m.kind}: "${answer.details.slice(0, 200)}" does not name ${m.field ?? "a field"}`,
  );
  assert.match(answer.details, /malformed/, `${rpc} ${m.kind}`);
}

/** Collects garbage when the process allows it (v8's flag set at run time). */
export function collect(): void {
  setFlagsFromString("--expose-gc");
  (runInNewContext("gc") as () => void)();
}

/** Memory after a full collection, in MiB: resident set, and what JavaScript holds (heap and external buffers). */
export interface MemorySample {
  rss: number;
  js: number;
}

/** The least of a few samples, each after a pause for closed calls' callbacks to run and a full collection. */
export async function memory(): Promise<MemorySample> {
  let least: MemorySample = { rss: Infinity, js: Infinity };
  for (let i = 0; i < 4; i++) {
    await new Promise((r) => setTimeout(r, 50));
    collect();
    const m = process.memoryUsage();
    least = { rss: Math.min(least.rss, m.rss / MiB), js: Math.min(least.js, (m.heapUsed + m.external) / MiB) };
  }
  return least;
}

/** Path of a method, as grpc-js routes it. */
export const pathOf = (service: DescService, method: string) => `/${service.typeName}/${method}`;

/** Tallies answers by status name, for the figures a test prints. */
export class Tally {
  readonly byRpc = new Map<string, Map<string, number>>();

  add(rpc: string, code: status | string): void {
    const name = typeof code === "string" ? code : status[code];
    let counts = this.byRpc.get(rpc);
    if (!counts) this.byRpc.set(rpc, (counts = new Map()));
    counts.set(name, (counts.get(name) ?? 0) + 1);
  }

  total(rpc: string): number {
    return [...(this.byRpc.get(rpc)?.values() ?? [])].reduce((a, b) => a + b, 0);
  }

  lines(): string[] {
    return [...this.byRpc].map(
      ([rpc, counts]) =>
        `${rpc}: ${this.total(rpc)} messages, ${[...counts]
          .sort((a, b) => b[1] - a[1])
          .map(([k, v]) => `${k} ${v}`)
          .join(", ")}`,
    );
  }
}

/**
 * `count` well-formed encodings made only of fields no saeflow message has (numbers 1000 and up),
 * some of them 1 MiB long: a receiver must ignore them, as protobuf does.
 */
export function unknownFields(count: number, rng: Rng): Uint8Array[] {
  return Array.from({ length: count }, (_, i) => {
    const number = 1000 + rng.int(100_000);
    const wire = rng.pick([0, 1, 2, 5]);
    const tag = varint((number << 3) | wire);
    if (wire === 0) return Uint8Array.from([...tag, ...varint(rng.int(2 ** 31))]);
    if (wire === 1) return Uint8Array.from([...tag, ...rng.bytes(8)]);
    if (wire === 5) return Uint8Array.from([...tag, ...rng.bytes(4)]);
    const length = i % 50 === 0 ? MiB : rng.int(64);
    const out = new Uint8Array(tag.length + varint(length).length + length);
    out.set([...tag, ...varint(length)]);
    return out;
  });
}

/**
 * The fuzz runs in rounds of the same size (8,000 to 11,000 messages a role). The first grows the
 * heap and malloc's arenas to what 1 MiB messages in flight need; a leak shows as growth over the
 * second. RSS moves by tens of MiB from round to round as native memory is kept or returned, so the
 * tight check is on what JavaScript holds (heap and external buffers, after a full collection): a
 * leak of 1 KiB per message would add ~10 MiB to it over a round.
 */
export const ROUNDS = [1, 2] as const;
/** RSS growth allowed over both rounds, after the warm-up. */
export const TOTAL_BOUND_MIB = 192;
/** RSS growth allowed over the second round. */
export const ROUND_BOUND_MIB = 96;
/** Growth of the JavaScript heap and external buffers allowed over the second round. */
export const JS_ROUND_BOUND_MIB = 8;

/** Asserts the memory bounds and prints the figures, given memory after the warm-up and after each round. */
export function assertMemoryBounded(role: string, before: MemorySample, after: readonly MemorySample[]): void {
  const [first, second] = after as [MemorySample, MemorySample];
  const signed = (v: number) => `${v >= 0 ? "+" : ""}${v.toFixed(1)}`;
  console.log(
    `fuzz ${role}: RSS ${before.rss.toFixed(0)} MiB after the warm-up, ${signed(first.rss - before.rss)} MiB over round 1, ` +
      `${signed(second.rss - first.rss)} MiB over round 2; JS heap and buffers ${before.js.toFixed(1)} MiB, ` +
      `${signed(first.js - before.js)} MiB over round 1, ${signed(second.js - first.js)} MiB over round 2`,
  );
  assert.ok(second.rss - before.rss < TOTAL_BOUND_MIB, `${role}: RSS grew ${(second.rss - before.rss).toFixed(1)} MiB over both rounds`);
  assert.ok(second.rss - first.rss < ROUND_BOUND_MIB, `${role}: RSS grew ${(second.rss - first.rss).toFixed(1)} MiB over round 2`);
  assert.ok(second.js - first.js < JS_ROUND_BOUND_MIB, `${role}: the JS heap grew ${(second.js - first.js).toFixed(1)} MiB over round 2`);
}
