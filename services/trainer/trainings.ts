import { create } from "@bufbuild/protobuf";
import type { RunConfig } from "../common/config/index.js";
import { type StatusResponse, StatusResponseSchema } from "../gen/saeflow/trainer/v1/trainer_pb.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";
import type { RunResult, Training } from "./training.js";

/**
 * The state of a process of several Trainings: starting while any starts, then running while any
 * runs, paused, draining, and stopped once all are.
 */
function combined(states: ServiceState[]): ServiceState {
  for (const s of [ServiceState.STARTING, ServiceState.RUNNING, ServiceState.PAUSED, ServiceState.DRAINING])
    if (states.includes(s)) return s;
  return ServiceState.STOPPED;
}

/** What several Trainings left behind, as one: every path, at the lowest step reached. */
function merged(results: RunResult[]): RunResult {
  return {
    step: Math.min(...results.map((r) => r.step)),
    checkpoints: results.flatMap((r) => r.checkpoints),
    exports: results.flatMap((r) => r.exports),
  };
}

/**
 * The Trainings of one trainer process, one per hook point it trains, run side by side (each with
 * its own batch source, loop, metrics and folders) and controlled as one: the control RPCs act on
 * every one of them.
 */
export class Trainings {
  private running: Promise<RunResult[]> | undefined;
  /** Settles once every hook point's SAEs have their sessions open. */
  readonly ready: Promise<void>;

  constructor(
    private readonly config: RunConfig,
    readonly all: readonly Training[],
  ) {
    this.ready = Promise.all(all.map((t) => t.ready)).then(() => undefined);
  }

  get hookPoints(): string[] {
    return this.all.map((t) => t.hookPoint);
  }

  get initialised(): boolean {
    return this.all.every((t) => t.initialised);
  }

  get state(): ServiceState {
    return combined(this.all.map((t) => t.state));
  }

  /**
   * Trains every hook point until each is done; `finished` is awaited as each one's training ends by
   * itself (its steps, the end of its streams, a Stop RPC), so that a hook point's buffer pools can
   * stop waiting for it while the others train on. One that fails ends the others too, each
   * checkpointed at the step it reached without exporting, so that a restart of the process resumes
   * every one (none of them is then finished); the first failure is thrown.
   */
  run(finished: (training: Training, result: RunResult) => Promise<void> = async () => undefined): Promise<RunResult[]> {
    this.running ??= (async () => {
      let failure: unknown;
      const results = await Promise.all(
        this.all.map((t) =>
          t.run().then(
            async (result) => {
              if (failure === undefined) await finished(t, result);
              return result;
            },
            async (err: unknown) => {
              failure ??= err;
              await Promise.all(this.all.map((other) => other.stop({ skipExport: true }).catch(() => undefined)));
              return undefined;
            },
          ),
        ),
      );
      if (failure !== undefined) throw failure;
      return results.filter((r) => r !== undefined);
    })();
    return this.running;
  }

  /** Pauses every hook point; settles once none has a step in flight. */
  async pause(): Promise<ServiceState> {
    await Promise.all(this.all.map((t) => t.pause()));
    return this.state;
  }

  resume(): ServiceState {
    for (const t of this.all) t.resume();
    return this.state;
  }

  /** Checkpoints every hook point's SAEs now, each between its steps. */
  async checkpointNow(): Promise<{ paths: string[]; step: number }> {
    const each = await Promise.all(this.all.map((t) => t.checkpointNow()));
    return { paths: each.flatMap((c) => c.paths), step: Math.min(...each.map((c) => c.step)) };
  }

  /** Stops every hook point after its step in flight; settles with what they all wrote. */
  async stop(options: { skipExport: boolean }): Promise<RunResult> {
    return merged(await Promise.all(this.all.map((t) => t.stop(options))));
  }

  /** The Status RPC's answer: every SAE of every hook point, each naming its hook point. */
  status(): StatusResponse {
    const reports = this.all.map((t) => ({ hookPoint: t.hookPoint, report: t.report() }));
    return create(StatusResponseSchema, {
      state: this.state,
      hookPoints: this.hookPoints,
      runDir: this.config.run.dir,
      waitMs: Math.max(...reports.map((r) => r.report.waitMs)),
      wallMs: Math.max(...reports.map((r) => r.report.wallMs)),
      saes: reports.flatMap(({ hookPoint, report }) =>
        report.saes.map((s) => ({
          name: s.name,
          hookPoint,
          recipe: s.recipe,
          step: BigInt(s.step),
          tokens: BigInt(s.tokens),
          mse: s.latest?.mse ?? 0,
          explainedVariance: s.latest?.explained_variance ?? 0,
          l0: s.latest?.l0 ?? 0,
          deadFraction: s.deadFraction,
          tokensPerSecond: s.latest?.tokens_per_second ?? 0,
          loss: s.latest?.loss ?? 0,
          learningRate: s.learningRate,
        })),
      ),
    });
  }
}
