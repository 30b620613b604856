import type { TransportConfig } from "../../services/common/config/index.js";
import { createClient } from "../../services/common/grpc/adapter.js";
import { type Message, toJson } from "@bufbuild/protobuf";
import type { GenMessage } from "@bufbuild/protobuf/codegenv2";
import {
  BufferService,
  type StatusResponse as BufferStatus,
  StatusResponseSchema as BufferStatusSchema,
} from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import {
  ProducerService,
  type StatusResponse as ProducerStatus,
  StatusResponseSchema as ProducerStatusSchema,
} from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import {
  TrainerService,
  type StatusResponse as TrainerStatus,
  StatusResponseSchema as TrainerStatusSchema,
} from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import type { RunFile } from "./run-file.js";

/** One status call to every service of a run; a service that does not answer is reported as such. */
export interface RunStatus {
  at: number;
  buffer: Array<{ id: string; status?: BufferStatus; error?: string }>;
  producers: Array<{ id: string; status?: ProducerStatus; error?: string }>;
  trainers: Array<{ id: string; status?: TrainerStatus; error?: string }>;
}

const deadline = (ms: number) => ({ deadline: Date.now() + ms });

async function ask<T>(fn: () => Promise<T>): Promise<{ status?: T; error?: string }> {
  try {
    return { status: await fn() };
  } catch (err) {
    return { error: (err as { details?: string }).details || (err as Error).message };
  }
}

/** Asks every service of `run` for its status, over `transport` (the run's, with the CLI's certificate under TLS). */
export async function collectStatus(run: Pick<RunFile, "services">, transport: TransportConfig, timeoutMs = 2000): Promise<RunStatus> {
  const calls = run.services.map(async (s) => {
    const service = s.role === "buffer" ? BufferService : s.role === "producer" ? ProducerService : TrainerService;
    const client = createClient(service, s.address, transport);
    try {
      return { s, r: await ask(() => client.status({}, deadline(timeoutMs))) };
    } finally {
      client.close();
    }
  });
  const results = await Promise.all(calls);
  const pick = <T>(role: string) =>
    results.filter((x) => x.s.role === role).map((x) => ({ id: x.s.id, ...(x.r as { status?: T; error?: string }) }));
  return {
    at: Date.now(),
    buffer: pick<BufferStatus>("buffer"),
    producers: pick<ProducerStatus>("producer"),
    trainers: pick<TrainerStatus>("trainer"),
  };
}

/** The statuses as protobuf JSON (what grpcurl prints), for files and `saeflow status --json`. */
export function statusJson(st: RunStatus): Record<string, unknown> {
  const each = <T extends Message>(schema: GenMessage<T>, list: Array<{ id: string; status?: T; error?: string }>) =>
    list.map((x) => ({ id: x.id, ...(x.status ? { status: toJson(schema, x.status) } : { error: x.error }) }));
  return {
    at: new Date(st.at).toISOString(),
    buffer: each(BufferStatusSchema, st.buffer),
    producers: each(ProducerStatusSchema, st.producers),
    trainers: each(TrainerStatusSchema, st.trainers),
  };
}

const stateName = (s: ServiceState | undefined) => (s === undefined ? "-" : (ServiceState[s]?.toLowerCase() ?? "?"));
const fmt = (x: number, digits = 3) => (Number.isFinite(x) ? x.toPrecision(digits) : "-");

/** The table `saeflow status` prints: one row per service, and one per SAE. */
export function statusTable(st: RunStatus): string {
  const rows: string[][] = [["service", "state", "detail"]];
  for (const b of st.buffer) {
    if (!b.status) rows.push([b.id, "unreachable", b.error ?? ""]);
    for (const h of b.status?.hookPoints ?? []) {
      rows.push([
        `${b.id} ${h.hookPoint}`,
        stateName(b.status!.state),
        `fill ${(h.fillFraction * 100).toFixed(0)}%  in ${h.rowsIn}  out ${h.rowsOut}  refills ${h.refillCycles}  trainer wait ${(h.trainerWaitMs / 1000).toFixed(1)}s  contexts/batch ${fmt(h.meanDistinctContexts)}`,
      ]);
    }
  }
  for (const p of st.producers) {
    if (!p.status) rows.push([p.id, "unreachable", p.error ?? ""]);
    else
      rows.push([
        p.id,
        stateName(p.status.state),
        `tokens ${p.status.tokens}  ${fmt(p.status.tokensPerSecond)} tok/s  docs ${p.status.position?.documentsDone ?? 0n}${p.status.pausedByBuffer ? "  (paused by buffer)" : ""}`,
      ]);
  }
  for (const t of st.trainers) {
    if (!t.status) rows.push([t.id, "unreachable", t.error ?? ""]);
    else {
      const wait = t.status.wallMs > 0 ? (100 * t.status.waitMs) / t.status.wallMs : 0;
      rows.push([t.id, stateName(t.status.state), `${t.status.hookPoints.join(", ")}  waiting ${wait.toFixed(0)}% of wall time`]);
      const several = t.status.hookPoints.length > 1;
      for (const sae of t.status.saes) {
        rows.push([
          several ? `  ${sae.hookPoint}/${sae.name}` : `  ${sae.name}`,
          sae.recipe,
          `step ${sae.step}  loss ${fmt(sae.loss)}  mse ${fmt(sae.mse)}  ev ${fmt(sae.explainedVariance)}  L0 ${fmt(sae.l0)}  dead ${(sae.deadFraction * 100).toFixed(1)}%  ${fmt(sae.tokensPerSecond)} tok/s`,
        ]);
      }
    }
  }
  const widths = [0, 1].map((i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => `${r[0]!.padEnd(widths[0]!)}  ${r[1]!.padEnd(widths[1]!)}  ${r[2]}`).join("\n");
}
