import type { DescMethod } from "@bufbuild/protobuf";
import { type ServiceError, status } from "@grpc/grpc-js";
import type { TransportConfig } from "../config/index.js";
import { LimitsSection } from "../config/sections/limits.js";

export type LimitsConfig = TransportConfig["limits"];

/** transport.limits' defaults, for parts built without a config. */
export const DEFAULT_LIMITS: LimitsConfig = LimitsSection.parse({});

/** Longest id (producer, trainer, group) a server keeps: ids are map keys and log text, never payload. */
export const MAX_ID_CHARS = 256;

/** Longest status detail sent: a detail quoting a client's string must not outgrow a trailer. */
export const MAX_DETAIL_CHARS = 1024;

/** A client's string for an error message: quoted, and cut to `max` characters with its length said. */
export function quoted(value: string, max = 64): string {
  return value.length <= max ? JSON.stringify(value) : `${JSON.stringify(value.slice(0, max))}… (${value.length} characters)`;
}

/** Streams that count against a per-run limit, by method name on saeflow's services (as authorize.ts names them). */
const COUNTED: Record<string, "producers" | "trainers"> = { Push: "producers", Batches: "trainers" };

export type Admission = { release(): void } | { refusal: Partial<ServiceError> };

/**
 * The per-run stream limits of one server: a Push stream is a producer and a Batches stream a trainer,
 * and one past `transport.limits.producers` / `trainers` is refused before its handler runs.
 */
export class StreamCounts {
  private readonly open = new Map<string, number>();

  constructor(private readonly limits: LimitsConfig) {}

  admit(method: DescMethod): Admission {
    const key = method.parent.typeName.startsWith("saeflow.") ? COUNTED[method.name] : undefined;
    if (!key) return { release: () => undefined };
    const open = this.open.get(key) ?? 0;
    const limit = this.limits[key];
    if (open >= limit) {
      return {
        refusal: {
          code: status.RESOURCE_EXHAUSTED,
          details: `transport.limits.${key}: ${open} ${method.name} streams are open, the most this server takes; ${method.parent.typeName}/${method.name} refused`,
        },
      };
    }
    this.open.set(key, open + 1);
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        this.open.set(key, this.open.get(key)! - 1);
      },
    };
  }
}
