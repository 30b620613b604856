import { type ServiceError, status } from "@grpc/grpc-js";
import { parseArgs } from "node:util";
import { loadConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { Health, type HealthCheckResponse } from "../../services/gen/grpc/health/v1/health_pb.js";

/**
 * grpc.health.v1 from inside the image, as the chart's probes ask it: run in a container of the
 * image with this folder mounted at /app/tools/image (tools/ is not in the image), so it uses the
 * image's own node, tsx, grpc-js and generated code.
 *
 *   node --import tsx tools/image/health-probe.ts --config /etc/saeflow/run.yaml \
 *     --target buffer=127.0.0.1:50051= --target buffer=127.0.0.1:50051=saeflow.buffer.v1.BufferService ...
 *
 * A target is role=address=service ("" is the whole server). Each is watched (Health/Watch, waiting
 * for a server that is not up yet) until it reports SERVING; every status received is printed as a
 * JSON line {role, service, status}, so a caller sees a role answer before it turns SERVING. Watch
 * rather than repeated Checks: a role that is SERVING only briefly (a trainer's last steps) is seen.
 * Exits 0 once every target was SERVING, 1 if --timeout-ms passes first.
 */

interface Target {
  role: string;
  address: string;
  service: string;
}

const { values } = parseArgs({
  options: {
    config: { type: "string" },
    target: { type: "string", multiple: true, default: [] },
    "timeout-ms": { type: "string", default: "120000" },
  },
  strict: true,
});
const transport = loadConfig({ file: values.config, env: process.env }).transport;
const targets: Target[] = values.target.map((t) => {
  const [role, address, service, ...rest] = t.split("=");
  if (!role || !address || service === undefined || rest.length) throw new Error(`--target ${t}: expected role=address=service`);
  return { role, address, service };
});

const print = (t: Target, status: string) => process.stdout.write(JSON.stringify({ role: t.role, service: t.service, status }) + "\n");

/** Resolves once `t` reports SERVING; retries while its server is not listening yet. */
async function serving(t: Target): Promise<void> {
  const client = createClient(Health, t.address, transport);
  try {
    for (;;) {
      const up = await new Promise<boolean>((resolve) => {
        const call = client.watch({ service: t.service });
        let seen = false;
        call.on("data", (m: HealthCheckResponse) => {
          print(t, Serving[m.status] ?? String(m.status));
          if (m.status === Serving.SERVING) {
            seen = true;
            call.cancel();
            resolve(true);
          }
        });
        call.on("error", (err: ServiceError) => {
          // UNAVAILABLE: not listening yet. Anything else (an unknown service name) is worth seeing.
          if (!seen && err.code !== status.UNAVAILABLE) print(t, `error ${status[err.code]}: ${err.details}`);
          resolve(false);
        });
        call.on("end", () => resolve(false));
      });
      if (up) return;
      await new Promise((r) => setTimeout(r, 250));
    }
  } finally {
    client.close();
  }
}

const timeoutMs = Number(values["timeout-ms"]);
const timer = setTimeout(() => {
  process.stderr.write(`health-probe: not every target was SERVING within ${timeoutMs} ms\n`);
  process.exit(1);
}, timeoutMs);
await Promise.all(targets.map(serving));
clearTimeout(timer);
process.exit(0);
