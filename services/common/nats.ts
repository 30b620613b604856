import { connect, type Msg, type NatsConnection, type Subscription } from "@nats-io/transport-node";
import type { z } from "zod";

/**
 * The one NATS connection helper. Every role connects through it: reconnects forever (a buffer or
 * NATS restart must not kill a producer), JSON messages validated by zod on receipt so that a peer's
 * bad message is logged and dropped, never thrown into the role.
 */
export interface Bus {
  publish<S extends z.ZodType>(subject: string, schema: S, message: z.input<S>): void;
  /** Calls `handler` for each valid message until the returned subscription is drained. */
  subscribe<S extends z.ZodType>(subject: string, schema: S, handler: (message: z.output<S>, subject: string) => void): Subscription;
  /** Request/reply with a validated answer; rejects on timeout or invalid answer. */
  request<Q extends z.ZodType, A extends z.ZodType>(
    subject: string,
    query: Q,
    message: z.input<Q>,
    answer: A,
    timeoutMs: number,
  ): Promise<z.output<A>>;
  /** Answers requests on `subject`; a handler error is logged and no answer is sent. */
  reply<Q extends z.ZodType, A extends z.ZodType>(
    subject: string,
    query: Q,
    answer: A,
    handler: (message: z.output<Q>) => z.input<A>,
  ): Subscription;
  /** Resolves once the server has seen everything published so far; false when it cannot be reached. */
  flush(): Promise<boolean>;
  /** True once drain() finished or the connection was lost for good. */
  isClosed(): boolean;
  /** Flushes what is published, ends subscriptions and closes; resolves once really closed, never rejects. */
  drain(): Promise<void>;
}

export interface BusOptions {
  url: string;
  /** Connection name shown by the server (e.g. "producer-0"). */
  name: string;
  /** How long the first connect may take. */
  connectTimeoutMs?: number;
  log?: (line: string) => void;
  /** Told when the connection to the server is lost and when it is back (the client reconnects on its own). */
  onConnection?: (up: boolean) => void;
}

export async function connectBus(options: BusOptions): Promise<Bus> {
  const log = options.log ?? ((line: string) => process.stderr.write(`${line}\n`));
  const nc = await connect({
    servers: options.url,
    name: options.name,
    maxReconnectAttempts: -1,
    reconnectTimeWait: 250,
    timeout: options.connectTimeoutMs ?? 5000,
  });
  void reportConnection(nc, options.url, log, options.onConnection);
  const decode = decoder(log);
  const listen = <S extends z.ZodType>(subject: string, schema: S, onValue: (value: z.output<S>, msg: Msg) => void): Subscription =>
    nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err) return log(`nats: subscription ${subject}: ${err.message}`);
        const value = decode(schema, msg.data, msg.subject);
        if (value !== undefined) onValue(value, msg);
      },
    });
  return {
    publish: (subject, schema, message) => nc.publish(subject, encode(schema.parse(message))),
    subscribe: (subject, schema, handler) => listen(subject, schema, (value, msg) => handler(value, msg.subject)),
    request: async (subject, query, message, answer, timeoutMs) => {
      const msg = await nc.request(subject, encode(query.parse(message)), { timeout: timeoutMs });
      const value = decode(answer, msg.data, subject);
      if (value === undefined) throw new Error(`nats: invalid answer on ${subject}`);
      return value;
    },
    reply: (subject, query, answer, handler) =>
      listen(subject, query, (value, msg) => {
        try {
          msg.respond(encode(answer.parse(handler(value))));
        } catch (e) {
          log(`nats: handler for ${subject} failed: ${(e as Error).message}`);
        }
      }),
    flush: () =>
      nc.isClosed()
        ? Promise.resolve(false)
        : nc.flush().then(
            () => true,
            () => false,
          ),
    isClosed: () => nc.isClosed(),
    drain: async () => {
      if (nc.isClosed()) return;
      try {
        await nc.drain();
      } catch {
        // The server is already gone (a run shutting down in any order): nothing left to flush.
        await nc.close().catch(() => undefined);
      }
    },
  };
}

const encode = (value: unknown) => new TextEncoder().encode(JSON.stringify(value));

/** JSON + zod decoding that logs and drops what a peer got wrong instead of throwing into the role. */
function decoder(log: (line: string) => void) {
  return <S extends z.ZodType>(schema: S, data: Uint8Array, subject: string): z.output<S> | undefined => {
    let json: unknown;
    try {
      json = JSON.parse(new TextDecoder().decode(data));
    } catch {
      log(`nats: dropped non-JSON message on ${subject}`);
      return undefined;
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) {
      log(`nats: dropped invalid message on ${subject}: ${parsed.error.issues.map((i) => `${i.path.join(".")}: ${i.message}`).join("; ")}`);
      return undefined;
    }
    return parsed.data;
  };
}

/** Says when the connection is lost and when it is back; the client reconnects by itself. */
async function reportConnection(nc: NatsConnection, url: string, log: (line: string) => void, onConnection?: (up: boolean) => void) {
  let lostAt = 0;
  for await (const st of nc.status()) {
    if (st.type === "disconnect" && !lostAt) {
      lostAt = Date.now();
      log(`nats: lost the connection to ${url}; reconnecting`);
      onConnection?.(false);
    } else if (st.type === "reconnect") {
      log(`nats: reconnected to ${url} after ${Date.now() - lostAt} ms`);
      lostAt = 0;
      onConnection?.(true);
    }
  }
}
