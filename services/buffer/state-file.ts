import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { z } from "zod";
import { ConfigError } from "../common/config/index.js";

const Mark = z.object({ context: z.number().int().min(0), offset: z.number().int().min(0) });

const HookLedger = z.object({
  rowsIn: z.number().int().min(0),
  rowsOut: z.number().int().min(0),
  held: z.number().int().min(0),
  cycle: z.number().int().min(0),
  dropped: z.record(z.string(), z.number().int().min(0)),
  /** Trainers that announced they are done with the pool: a restarted buffer does not wait for them again. */
  doneReaders: z.array(z.string()).default([]),
});

/** What a buffer keeps on disk so that the one that replaces it goes on with the run's ledger. */
export const BufferState = z.object({
  version: z.literal(1),
  runId: z.string(),
  /** False while the buffer runs: found false, it was left by a buffer that died. */
  clean: z.boolean(),
  /** Row ids are never given twice in a run, across restarts too. */
  nextRowId: z.number().int().min(0),
  hooks: z.record(z.string(), HookLedger),
  /** Per producer: its lineage and, per hook point, the first row not yet answered (see marks.ts). */
  marks: z.record(z.string(), z.object({ lineage: z.string(), hooks: z.record(z.string(), Mark) })),
  /** Other shards heard to drain or stop: a restarted buffer still tells its producers (Demand.endedShards). */
  endedShards: z.array(z.number().int().min(0)).default([]),
});
export type BufferState = z.infer<typeof BufferState>;

/**
 * buffer.stateFile: the buffer's ledger and marks, rewritten (atomically, by rename) at every point
 * where a change becomes visible outside the process, before it does: after a chunk is placed and
 * before its answer, after a batch is gathered and before it is sent. So a buffer killed at any
 * moment leaves a file that agrees with everything its peers were told: an unanswered chunk is not in
 * it (the producer re-sends it and it is accepted then), an answered one is (a re-send is a
 * duplicate), and the rows it held are the rows its pool lost.
 */
export class BufferStateFile {
  constructor(
    readonly path: string,
    private readonly runId: string,
  ) {}

  /** The saved state, or undefined when there is none; refuses a file that is not one or belongs to another run. */
  load(): BufferState | undefined {
    if (!existsSync(this.path)) return undefined;
    let state: BufferState;
    try {
      state = BufferState.parse(JSON.parse(readFileSync(this.path, "utf8")));
    } catch (err) {
      throw ConfigError.at("buffer.stateFile", `${this.path} is not a buffer state file: ${(err as Error).message}`);
    }
    if (state.runId !== this.runId) {
      throw ConfigError.at("buffer.stateFile", `${this.path} belongs to run "${state.runId}", not "${this.runId}"; point it elsewhere`);
    }
    return state;
  }

  save(state: BufferState): void {
    const tmp = `${this.path}.tmp`;
    writeFileSync(tmp, JSON.stringify(state));
    renameSync(tmp, this.path);
  }

  /** Makes the folder once, so that save() is two system calls. */
  prepare(): void {
    mkdirSync(dirname(this.path), { recursive: true });
  }
}
