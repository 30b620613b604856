import { status } from "@grpc/grpc-js";
import { FieldError } from "../errors.js";
import { Health, HealthCheckResponse_ServingStatus as Serving } from "../../gen/grpc/health/v1/health_pb.js";
import { Signal } from "../signal.js";
import type { ServiceHandlers } from "./adapter.js";
import { quoted } from "./limits.js";

export { Serving };

/**
 * The standard grpc.health.v1 protocol, which Kubernetes' native gRPC probes call. "" is the whole
 * server; each role also registers its own service name.
 */
export class HealthState {
  private readonly statuses = new Map<string, Serving>();
  private readonly changed = new Signal();
  private closed = false;

  constructor(services: string[]) {
    for (const s of ["", ...services]) this.statuses.set(s, Serving.NOT_SERVING);
  }

  /** Sets the status of `service`, or of every registered service when omitted. */
  set(serving: Serving, service?: string): void {
    const targets = service === undefined ? [...this.statuses.keys()] : [service];
    for (const t of targets) this.statuses.set(t, serving);
    this.changed.notify();
  }

  get(service: string): Serving | undefined {
    return this.statuses.get(service);
  }

  handlers(): ServiceHandlers<typeof Health> {
    return {
      check: async (req) => {
        const s = this.statuses.get(req.service);
        if (s === undefined) throw new FieldError("service", `unknown service ${quoted(req.service)}`, status.NOT_FOUND);
        return { status: s };
      },
      watch: (req, ctx) => this.watch(req.service, ctx.signal),
      list: async () => ({
        statuses: Object.fromEntries([...this.statuses].map(([k, v]) => [k, { status: v }])),
      }),
    };
  }

  /** The current status of `service`, then each change, until the watcher leaves or the server closes. */
  private async *watch(service: string, signal: AbortSignal): AsyncGenerator<{ status: Serving }> {
    let last: Serving | undefined;
    while (!this.closed && !signal.aborted) {
      const s = this.statuses.get(service) ?? Serving.SERVICE_UNKNOWN;
      if (s !== last) yield { status: (last = s) };
      await this.changed.wait(signal);
    }
  }

  /** Ends every Watch stream (on shutdown). */
  close(): void {
    this.closed = true;
    this.changed.notify();
  }
}
