import { randomUUID } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname } from "node:path";
import { z } from "zod";
import { ConfigError } from "../../common/config/index.js";

/** A point in the token stream of a shard: the document at a byte offset, and a token inside it. */
export const Cursor = z.object({
  epoch: z.number().int().min(0),
  fileIndex: z.number().int().min(0),
  offset: z.number().int().min(0),
  documentIndex: z.number().int().min(0),
  /** Tokens of that document already packed into earlier contexts. */
  tokenOffset: z.number().int().min(0),
});
export type Cursor = z.infer<typeof Cursor>;

export const START: Cursor = { epoch: 0, fileIndex: 0, offset: 0, documentIndex: 0, tokenOffset: 0 };

/** Where a producer stands: the resume cursor and the counters status reports. */
export const Position = z.object({
  cursor: Cursor,
  documentsDone: z.number().int().min(0),
  contexts: z.number().int().min(0),
  exhausted: z.boolean(),
  /** Next chunk sequence per hook point (chunk names in Push answers; the buffer de-duplicates by context id). */
  nextSequence: z.record(z.string(), z.number().int().min(0)),
  /**
   * The pass through the shard these context ids count in, made when the shard starts afresh: the
   * buffer de-duplicates re-sent rows by (lineage, context id), see docs/nats.md.
   */
  lineage: z.string().default(""),
  /** Rows per hook point and tokens of every pass delivered so far, across restarts: the run's ledger starts here. */
  produced: z
    .object({
      rows: z.number().int().min(0),
      tokens: z.number().int().min(0),
      /**
       * Per hook point, rows of the delivered passes whose chunk of it was sent: fewer than `rows` once
       * its buffer shard ended while others went on. Absent in files saved before shards, whose every
       * pass was sent whole.
       */
      hooks: z.record(z.string(), z.number().int().min(0)).optional(),
    })
    .default({ rows: 0, tokens: 0 }),
  /**
   * Hook points whose buffer shard ended (its trainers were done, or it was drained) while this
   * producer fed others: a restarted producer does not wait for that shard, which is gone.
   */
  endedHooks: z.array(z.string()).optional(),
});
export type Position = z.infer<typeof Position>;

export const freshPosition = (): Position => ({
  cursor: { ...START },
  documentsDone: 0,
  contexts: 0,
  exhausted: false,
  nextSequence: {},
  lineage: randomUUID(),
  produced: { rows: 0, tokens: 0 },
});

const StateFile = z.object({
  version: z.literal(1),
  /** What the cursor is only meaningful for: files, shard, splitting, tokenizer, packing. */
  fingerprint: z.string(),
  position: Position,
});

/**
 * The saved position of a producer. It is written (atomically, by rename) after chunks are
 * acknowledged, so a restarted producer regenerates at most the chunks that were in flight, under
 * the same sequence numbers, which the buffer then recognises as duplicates.
 */
export class PositionStore {
  constructor(
    readonly path: string,
    private readonly fingerprint: string,
  ) {}

  /** The saved position, or undefined when none is saved; refuses one saved for another dataset. */
  load(key = "producer.stateFile"): Position | undefined {
    if (!existsSync(this.path)) return undefined;
    let parsed: z.infer<typeof StateFile>;
    try {
      parsed = StateFile.parse(JSON.parse(readFileSync(this.path, "utf8")));
    } catch (err) {
      throw ConfigError.at(key, `${this.path} is not a producer position file: ${(err as Error).message}`);
    }
    if (parsed.fingerprint !== this.fingerprint) {
      throw ConfigError.at(
        key,
        `${this.path} was saved for another dataset, shard, tokenizer or packing (${parsed.fingerprint} vs ${this.fingerprint}); delete it or set producer.resume=false`,
      );
    }
    return parsed.position;
  }

  save(position: z.input<typeof Position>): void {
    mkdirSync(dirname(this.path), { recursive: true });
    const tmp = `${this.path}.tmp`;
    writeFileSync(tmp, JSON.stringify({ version: 1, fingerprint: this.fingerprint, position }));
    renameSync(tmp, this.path);
  }
}
