import { readFileSync } from "node:fs";
import {
  type Authenticator,
  connect,
  type ConnectionOptions,
  credsAuthenticator,
  type Msg,
  type NatsConnection,
  nkeyAuthenticator,
  type Subscription,
  type TlsOptions,
} from "@nats-io/transport-node";
import type { z } from "zod";
import type { NatsConfig } from "./config/index.js";
import { ConfigError } from "./config/error.js";

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

/** How to prove who we are to the NATS server, and whether to speak TLS: the credential and TLS keys of config.nats. */
export type NatsSecurity = Omit<NatsConfig, "url" | "subjectPrefix">;

export interface BusOptions {
  url: string;
  /** Connection name shown by the server (e.g. "producer-0"). */
  name: string;
  /** Credentials and TLS (pass config.nats); absent connects anonymously, TLS only for a tls:// url. */
  security?: NatsSecurity;
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
    ...securityOptions(options.url, options.security),
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

function readSecret(key: "credsFile" | "nkeyFile" | "passwordFile" | "tokenFile", path: string): Uint8Array {
  try {
    return readFileSync(path);
  } catch (err) {
    throw ConfigError.at(`nats.${key}`, `cannot read ${path}: ${(err as Error).message}`);
  }
}

/** A secret file's text; a trailing newline (echo > file) is not part of the secret. */
const secretText = (key: "nkeyFile" | "passwordFile" | "tokenFile", path: string): string =>
  new TextDecoder().decode(readSecret(key, path)).replace(/\r?\n$/, "");

/** nats.js connect options for config.nats' credentials and TLS; files are read now, so a bad path names its key. */
export function securityOptions(url: string, s: NatsSecurity | undefined): Partial<ConnectionOptions> {
  const out: Partial<ConnectionOptions> = {};
  if (!s) return url.startsWith("tls://") ? { tls: {} } : out;
  if (s.user) Object.assign(out, { user: s.user, pass: s.passwordFile ? secretText("passwordFile", s.passwordFile) : s.password });
  if (s.token || s.tokenFile) out.token = s.tokenFile ? secretText("tokenFile", s.tokenFile) : s.token;
  const authenticators: Authenticator[] = [];
  if (s.credsFile) authenticators.push(credsAuthenticator(readSecret("credsFile", s.credsFile)));
  if (s.nkeyFile) authenticators.push(nkeyAuthenticator(new TextEncoder().encode(secretText("nkeyFile", s.nkeyFile).trim())));
  if (authenticators.length) out.authenticator = authenticators;
  const tls: TlsOptions = {
    ...(s.tls.ca ? { caFile: s.tls.ca } : {}),
    ...(s.tls.cert ? { certFile: s.tls.cert, keyFile: s.tls.key } : {}),
  };
  if (Object.keys(tls).length || url.startsWith("tls://")) out.tls = tls;
  return out;
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
