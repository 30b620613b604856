import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import type { RunStatus } from "./status.js";

const stateName = (s: ServiceState) => ServiceState[s]?.toLowerCase() ?? "?";
const pct = (x: number) => `${(x * 100).toFixed(0)}%`;

/**
 * Who waits for what, from one round of statuses and what the CLI knows to be down: the line the
 * watchdog prints when no trainer has taken a step for a while, so that no run hangs without saying why.
 */
export function explainStall(st: RunStatus, down: string[], mixFloor: number): string {
  const said: string[] = [];
  if (down.length) said.push(`down: ${down.join(", ")}`);
  for (const t of st.trainers) {
    if (!t.status) said.push(`${t.id} does not answer (${t.error ?? "?"})`);
    else if (t.status.state === ServiceState.PAUSED) said.push(`${t.id} is paused by an operator`);
    else said.push(`${t.id} is ${stateName(t.status.state)}, waiting for batches`);
  }
  for (const b of st.buffer) {
    if (!b.status) {
      said.push(`${b.id} does not answer (${b.error ?? "?"})`);
      continue;
    }
    const producers = b.status.producers.length;
    for (const h of b.status.hookPoints) {
      const refill = h.refilling ? "asking producers to refill" : "not asking for rows";
      said.push(
        `${b.id} is ${stateName(b.status.state)}: ${h.hookPoint} holds ${pct(h.fillFraction)} (batches are drawn above ${pct(mixFloor)}), ${refill}, ${producers} producer(s) heard over NATS`,
      );
    }
  }
  for (const p of st.producers) {
    if (!p.status) said.push(`${p.id} does not answer (${p.error ?? "?"})`);
    else {
      const why = p.status.pausedByBuffer ? ", paused by the buffer" : "";
      said.push(`${p.id} is ${stateName(p.status.state)}${why}, ${p.status.tokensPerSecond.toFixed(0)} tok/s`);
    }
  }
  return said.join("; ");
}

/** Says, every `everyMs` while no trainer step is taken, who waits for what. */
export class Watchdog {
  private saidAt = 0;

  constructor(
    private readonly everyMs: number,
    private readonly mixFloor: number,
    private readonly log: (line: string) => void,
  ) {}

  check(st: RunStatus, stalledS: number, down: string[]): void {
    if (stalledS * 1000 < this.everyMs) {
      this.saidAt = 0;
      return;
    }
    if (this.saidAt && st.at - this.saidAt < this.everyMs) return;
    this.saidAt = st.at;
    this.log(`no trainer step for ${stalledS.toFixed(0)} s: ${explainStall(st, down, this.mixFloor)}`);
  }
}
