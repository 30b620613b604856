import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { resolve } from "node:path";
import { fromJson, type JsonValue, type Message } from "@bufbuild/protobuf";
import type { GenMessage } from "@bufbuild/protobuf/codegenv2";
import type { TransportConfig } from "../../services/common/config/index.js";
import { StatusResponseSchema as BufferStatusSchema } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { StatusResponseSchema as ProducerStatusSchema } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { StatusResponseSchema as TrainerStatusSchema } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { type HookLedger, ledgerOf } from "./ledger.js";
import type { RoleProcess } from "./processes.js";
import { collectStatus, type RunStatus, statusJson } from "./status.js";

type Service = Pick<RoleProcess, "id" | "role" | "address" | "statusFile">;

type Entry<T> = { id: string; status?: T; error?: string };

/** The last Status a role wrote when it exited, or undefined when there is none (it is still running, or was killed). */
function lastWords<T extends Message>(s: Service, schema: GenMessage<T>): T | undefined {
  if (!existsSync(s.statusFile)) return undefined;
  try {
    const { status } = JSON.parse(readFileSync(s.statusFile, "utf8")) as { status: JsonValue };
    return fromJson(schema, status);
  } catch {
    return undefined;
  }
}

/** Each service of `role`: what it wrote as it exited, else what it answered now. */
function entries<T extends Message>(
  services: Service[],
  role: Service["role"],
  schema: GenMessage<T>,
  live: Array<Entry<T>>,
): Array<Entry<T>> {
  return services
    .filter((s) => s.role === role)
    .map((s) => {
      const own = lastWords(s, schema);
      return own ? { id: s.id, status: own } : (live.find((x) => x.id === s.id) ?? { id: s.id, error: "no status" });
    });
}

/**
 * Every role's status at the end of the run: the one each wrote as it exited (serviceMain), so the
 * figures are final and were taken with nothing moving; a role still running is asked instead.
 */
export async function finalStatus(services: Service[], transport: TransportConfig): Promise<RunStatus> {
  const running = services.filter((s) => !existsSync(s.statusFile)).map((s) => ({ ...s, pid: 0, log: "" }));
  const asked = await collectStatus({ services: running }, transport);
  return {
    at: Date.now(),
    buffer: entries(services, "buffer", BufferStatusSchema, asked.buffer),
    producers: entries(services, "producer", ProducerStatusSchema, asked.producers),
    trainers: entries(services, "trainer", TrainerStatusSchema, asked.trainers),
  };
}

/** Writes final-status.json: every role's final status, and the run's row ledger per hook point. */
export function writeFinalStatus(runDir: string, st: RunStatus): HookLedger[] {
  const ledger = ledgerOf(st);
  writeFileSync(resolve(runDir, "final-status.json"), `${JSON.stringify({ ...statusJson(st), ledger }, null, 2)}\n`);
  return ledger;
}
