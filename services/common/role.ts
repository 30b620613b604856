import type { Bus } from "./nats.js";

/**
 * The shape every role has: `services/<role>/<role>.ts` exports `start<Role>(config, deps)`, which
 * resolves once the role serves, with this handle. The CLI, tests, benches and main.ts all start a
 * role through it.
 *
 * One lifecycle vocabulary runs through the code, after nats.js:
 * - `start…()`  makes a thing and starts it; resolves once it works.
 * - `ready`     a promise that settles once a thing can do its work (a trainer with its sessions open).
 * - `finished`  a role's work is over: resolves with undefined, or with the Error that ended it; never rejects.
 * - `stop()`    a role stops cleanly (checkpoint, flush, leave the run); resolves once really stopped; idempotent.
 * - `drain()`   a part stops taking new work, finishes what it holds, then closes.
 * - `close()`   a part lets go at once; resolves once released.
 * - `closed()`  resolves once a part is closed; never rejects.
 */
export interface Role<Status> {
  /** host:port its gRPC server actually bound. */
  readonly address: string;
  readonly finished: Promise<Error | undefined>;
  /** The same status its Status RPC answers. */
  status(): Status;
  stop(): Promise<void>;
}

/** What a role may be handed instead of making it itself; absent parts come from the config. */
export interface RoleDeps {
  /** Where the gRPC server binds instead of the config's address (tests bind 127.0.0.1:0). */
  address?: string;
  /** Progress and problem lines; default stderr. */
  log?: (line: string) => void;
  /** A NATS connection the role uses and leaves open; absent, it connects to nats.url and drains that on stop. */
  bus?: Bus;
}

export const stderrLog = (line: string): void => void process.stderr.write(`${line}\n`);

/** Settles with undefined when `work` resolves and with its error when it rejects: a `finished` that never rejects. */
export function outcome(work: Promise<unknown>): Promise<Error | undefined> {
  return work.then(
    () => undefined,
    (err: unknown) => (err instanceof Error ? err : new Error(String(err))),
  );
}
