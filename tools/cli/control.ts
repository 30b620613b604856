import type { TransportConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { Serving } from "../../services/common/grpc/health.js";
import { Health } from "../../services/gen/grpc/health/v1/health_pb.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { exitReport, type RoleProcess } from "./processes.js";
import type { RunStatus } from "./status.js";

/**
 * The control RPCs `saeflow up` and `saeflow stop` make to the roles of a local run, over the
 * run's transport with the operator's certificate when the run is under TLS.
 */

const log = (line: string) => process.stderr.write(`saeflow: ${line}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Resolves once `p` reports SERVING; throws with the role's own error when it exits first. */
export async function waitServing(p: RoleProcess, service: string, transport: TransportConfig, timeoutMs: number): Promise<void> {
  const until = Date.now() + timeoutMs;
  let code: number | undefined;
  void p.exited.then((c) => (code = c));
  while (Date.now() < until && code === undefined) {
    // A channel per check: one that was refused backs off before it tries again (1 s, then 1.6
    // times longer each time), which would see a role that took 10 s to listen 5 s late.
    const health = createClient(Health, p.address, transport);
    try {
      if ((await health.check({ service }, { deadline: Date.now() + 1000 })).status === Serving.SERVING) return;
    } catch {
      // not listening yet
    } finally {
      health.close();
    }
    await sleep(200);
  }
  if (code === undefined) throw new Error(`${p.id} at ${p.address} not serving after ${timeoutMs} ms (see ${p.log})`);
  throw new Error(`during start-up, ${exitReport(p, code)}`);
}

/** Asks the buffer to serve what it holds, then end the trainers' streams. */
export async function drainBuffer(address: string, transport: TransportConfig): Promise<void> {
  const client = createClient(BufferService, address, transport);
  try {
    await client.drain({}, { deadline: Date.now() + 5000 });
  } catch {
    // Already gone; nothing to drain.
  } finally {
    client.close();
  }
}

/** Asks a trainer to checkpoint, export and stop; false (and a line saying why) when it did not answer. */
export async function stopTrainer(address: string, transport: TransportConfig): Promise<boolean> {
  const client = createClient(TrainerService, address, transport);
  try {
    await client.stop({}, { deadline: Date.now() + 120_000 });
    return true;
  } catch (err) {
    log(`trainer at ${address} did not stop cleanly: ${(err as Error).message}`);
    return false;
  } finally {
    client.close();
  }
}

/** The furthest step any SAE of any trainer reports in `st`. */
export const furthestStep = (st: RunStatus): number =>
  Math.max(0, ...st.trainers.flatMap((t) => (t.status?.saes ?? []).map((s) => Number(s.step))));
