import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import { FieldError } from "../errors.js";
import {
  Health,
  type HealthCheckResponse,
  HealthCheckResponse_ServingStatus as Serving,
  HealthCheckResponseSchema,
} from "../../gen/grpc/health/v1/health_pb.js";
import type { ServiceHandlers } from "./adapter.js";

export { Serving };

/**
 * The standard grpc.health.v1 protocol, which Kubernetes' native gRPC probes call. "" is the whole
 * server; each role also registers its own service name.
 */
export class HealthState {
  private readonly statuses = new Map<string, Serving>();
  private readonly watchers = new Set<(service: string, s: Serving) => void>();

  constructor(services: string[]) {
    for (const s of ["", ...services]) this.statuses.set(s, Serving.NOT_SERVING);
  }

  /** Sets the status of `service`, or of every registered service when omitted. */
  set(serving: Serving, service?: string): void {
    const targets = service === undefined ? [...this.statuses.keys()] : [service];
    for (const t of targets) {
      this.statuses.set(t, serving);
      for (const w of this.watchers) w(t, serving);
    }
  }

  get(service: string): Serving | undefined {
    return this.statuses.get(service);
  }

  handlers(): ServiceHandlers<typeof Health> {
    const reply = (s: Serving): HealthCheckResponse => create(HealthCheckResponseSchema, { status: s });
    return {
      check: async (req) => {
        const s = this.statuses.get(req.service);
        if (s === undefined) throw new FieldError("service", `unknown service "${req.service}"`, status.NOT_FOUND);
        return { status: s };
      },
      watch: (req, call) =>
        new Promise<void>((resolve) => {
          call.write(reply(this.statuses.get(req.service) ?? Serving.SERVICE_UNKNOWN));
          const watcher = (service: string, s: Serving) => {
            if (service === req.service) call.write(reply(s));
          };
          this.watchers.add(watcher);
          call.on("cancelled", () => {
            this.watchers.delete(watcher);
            resolve();
          });
        }),
      list: async () => ({
        statuses: Object.fromEntries([...this.statuses].map(([k, v]) => [k, { status: v }])),
      }),
    };
  }

  /** Ends every Watch stream (on shutdown) by dropping watchers; the server's shutdown closes calls. */
  close(): void {
    this.watchers.clear();
  }
}
