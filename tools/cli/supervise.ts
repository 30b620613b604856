import { appendFileSync } from "node:fs";
import { join } from "node:path";
import type { TransportConfig } from "../../services/common/config/index.js";
import { BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { TrainerService } from "../../services/gen/saeflow/trainer/v1/trainer_pb.js";
import { waitServing } from "./control.js";
import type { NatsForRun } from "./nats.js";
import type { NatsServer } from "./nats-server.js";
import { errorLines, exitReport, howEnded, type RoleProcess } from "./processes.js";

/**
 * `saeflow up` supervises its processes as Kubernetes supervises a Job's pods: a role that exits
 * abnormally is started again (it resumes: a trainer from its newest checkpoint, a producer from its
 * saved position, the buffer from its state file) until it has used `launch.restarts` restarts; one
 * that refuses its config (exit 2) is not, as the chart's podFailurePolicy fails the Job at once. The
 * nats-server the CLI started is restarted the same way, on the same port. Every event is one line
 * (who, how it ended, its log, what was done) and one record of events.jsonl in the run folder.
 */
export interface RoleSpec {
  role: RoleProcess["role"];
  id: string;
  address: string;
  sets: string[];
}

/** One role of the run across its restarts. */
export interface Slot {
  spec: RoleSpec;
  proc: RoleProcess;
  restarts: number;
  state: "running" | "restarting" | "finished" | "failed" | "stopped";
  /** When it went down, while it is restarting. */
  downSince?: number;
  /** Its first process answered health SERVING: from then on an abnormal exit is a crash to restart, not a failed start. */
  served: boolean;
  spawnedAt: number;
  /** The exit code it ended with for good: 0 when its work is done. */
  readonly done: Promise<number>;
}

export interface SupervisorOptions {
  runDir: string;
  /** Restarts each role may use (launch.restarts). */
  budget: number;
  /** How the CLI calls the roles (health checks after a restart). */
  cli: TransportConfig;
  spawn: (spec: RoleSpec) => RoleProcess;
  log: (line: string) => void;
  /** A role failed for good (budget spent, config refused): the run must stop. */
  onFailure: (slot: Slot) => void;
  /** A role was started again: run.json names its new pid. */
  onRestart: () => void;
}

const SERVICE = { buffer: BufferService.typeName, producer: ProducerService.typeName, trainer: TrainerService.typeName };
/**
 * A first process that exits this soon, before it ever served, failed to start (a bad path, no NATS):
 * starting it again would fail the same way, so the run stops with its own words instead.
 */
const START_GRACE_MS = 20_000;
const backoff = (restart: number) => Math.min(500 * 2 ** (restart - 1), 5000);

/** One record of events.jsonl. */
export interface RunEvent {
  t: string;
  who: string;
  event: "exited" | "restarted" | "serving" | "gave_up" | "refused";
  ended?: string;
  restart?: number;
  budget?: number;
  /** Seconds since it went down (serving). */
  seconds?: number;
}

export class Supervisor {
  readonly slots: Slot[] = [];
  /** Set when the CLI takes the run down: exits from here on are its own doing. */
  ending = false;

  constructor(private readonly options: SupervisorOptions) {}

  start(spec: RoleSpec): Slot {
    let settle!: (code: number) => void;
    const done = new Promise<number>((resolve) => (settle = resolve));
    const slot: Slot = { spec, proc: this.options.spawn(spec), restarts: 0, state: "running", done, served: false, spawnedAt: Date.now() };
    this.slots.push(slot);
    this.watch(slot, settle);
    void waitServing(slot.proc, SERVICE[spec.role], this.options.cli, 600_000).then(
      () => (slot.served = true),
      () => undefined,
    );
    return slot;
  }

  /** Slots of one role. */
  of(role: RoleSpec["role"]): Slot[] {
    return this.slots.filter((s) => s.spec.role === role);
  }

  /** Records an event in events.jsonl. */
  record(event: Omit<RunEvent, "t">): void {
    appendFileSync(join(this.options.runDir, "events.jsonl"), `${JSON.stringify({ t: new Date().toISOString(), ...event })}\n`);
  }

  private watch(slot: Slot, settle: (code: number) => void): void {
    void slot.proc.exited.then((code) => this.exited(slot, code, settle));
  }

  private exited(slot: Slot, code: number, settle: (code: number) => void): void {
    const { id } = slot.spec;
    const { log, budget } = this.options;
    const ended = howEnded(slot.proc, code);
    if (this.ending || code === 0) {
      slot.state = code === 0 ? "finished" : "stopped";
      return settle(code);
    }
    const where = `(log: ${slot.proc.log})`;
    const said = slot.proc.signal ? "" : `\n${(errorLines(slot.proc) ?? "(its log is empty)").replace(/^/gm, "  ")}`;
    const failedStart = slot.restarts === 0 && !slot.served && Date.now() - slot.spawnedAt < START_GRACE_MS;
    if (code === 2 || failedStart) {
      slot.state = "failed";
      log(exitReport(slot.proc, code));
      this.record({ who: id, event: "refused", ended });
      this.options.onFailure(slot);
      return settle(code);
    }
    if (slot.restarts >= budget) {
      slot.state = "failed";
      log(`${id} exited with ${ended} ${where}; its restart budget is spent (launch.restarts = ${budget}): stopping the run${said}`);
      this.record({ who: id, event: "gave_up", ended, budget });
      this.options.onFailure(slot);
      return settle(code);
    }
    slot.restarts++;
    slot.state = "restarting";
    slot.downSince = Date.now();
    log(`${id} exited with ${ended} ${where}; restarting it (restart ${slot.restarts} of ${budget})${said}`);
    this.record({ who: id, event: "exited", ended, restart: slot.restarts, budget });
    setTimeout(() => this.restart(slot, settle, code), backoff(slot.restarts));
  }

  private restart(slot: Slot, settle: (code: number) => void, lastCode: number): void {
    if (this.ending) {
      slot.state = "stopped";
      return settle(lastCode);
    }
    slot.proc = this.options.spawn(slot.spec);
    this.record({ who: slot.spec.id, event: "restarted", restart: slot.restarts });
    this.options.onRestart();
    this.watch(slot, settle);
    const proc = slot.proc;
    void waitServing(proc, SERVICE[slot.spec.role], this.options.cli, 120_000).then(
      () => {
        if (slot.proc !== proc || slot.state !== "restarting") return;
        const seconds = (Date.now() - slot.downSince!) / 1000;
        slot.state = "running";
        slot.served = true;
        slot.downSince = undefined;
        this.options.log(`${slot.spec.id} is serving again, ${seconds.toFixed(1)} s after it went down`);
        this.record({ who: slot.spec.id, event: "serving", seconds });
      },
      () => undefined,
    );
  }
}

/**
 * The nats-server this run started, restarted on its port when it dies (within the same budget). Roles
 * reconnect to it by themselves; `down` says since when it has been gone, for the progress line.
 */
export class NatsWatch {
  restarts = 0;
  down: number | undefined;
  ending = false;
  private server: NatsServer;

  constructor(
    private readonly nats: NatsForRun & { server: NatsServer },
    private readonly sup: Supervisor,
    private readonly budget: number,
    private readonly log: (line: string) => void,
    private readonly onFailure: () => void,
    private readonly onRestart: () => void,
  ) {
    this.server = nats.server;
    this.watch();
  }

  get pid(): number {
    return this.server.pid;
  }

  async stop(): Promise<void> {
    this.ending = true;
    await this.server.stop();
  }

  private watch(): void {
    const server = this.server;
    void server.exited.then(({ code, signal }) => {
      if (this.ending || server !== this.server) return;
      const ended = signal ? `signal ${signal}` : `exit code ${code}`;
      this.down = Date.now();
      if (this.restarts >= this.budget) {
        this.log(`nats-server exited with ${ended}; its restart budget is spent (launch.restarts = ${this.budget}): stopping the run`);
        this.sup.record({ who: "nats-server", event: "gave_up", ended, budget: this.budget });
        return this.onFailure();
      }
      this.restarts++;
      this.log(`nats-server exited with ${ended}; restarting it on port ${server.port} (restart ${this.restarts} of ${this.budget})`);
      this.sup.record({ who: "nats-server", event: "exited", ended, restart: this.restarts, budget: this.budget });
      void this.again();
    });
  }

  private async again(): Promise<void> {
    for (let attempt = 1; !this.ending; attempt++) {
      try {
        this.server = await this.nats.restart!();
        const seconds = (Date.now() - this.down!) / 1000;
        this.down = undefined;
        this.log(`nats-server is serving again on port ${this.server.port}, ${seconds.toFixed(1)} s after it went down`);
        this.sup.record({ who: "nats-server", event: "serving", seconds });
        this.onRestart();
        return this.watch();
      } catch (err) {
        // The port may linger a moment after a kill; try again shortly.
        if (attempt >= 10) {
          this.log(`nats-server could not be started again: ${(err as Error).message}`);
          return this.onFailure();
        }
        await new Promise((r) => setTimeout(r, 500));
      }
    }
  }
}
