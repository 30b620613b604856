/**
 * Where a producer's rows of one hook point stand: a row is named by its context id and its index
 * within that context, and a mark is the first row not yet answered. Context ids count up within a
 * producer's lineage (its pass through its shard, kept across restarts that resume), every chunk
 * holds whole contexts in order, and packing is deterministic, so a re-sent row, whether re-sent on
 * a new stream or made again by a restarted producer that resumed from an older saved position,
 * has the same name, and it is a duplicate exactly when it lies below the mark. Sequence numbers
 * would not do: a restarted producer sizes its passes by its current grant, so its chunk k may hold
 * other contexts than before.
 */
export interface RowMark {
  context: number;
  offset: number;
}

const ORIGIN: RowMark = { context: 0, offset: 0 };

const below = (a: RowMark, b: RowMark) => a.context < b.context || (a.context === b.context && a.offset < b.offset);
const later = (a: RowMark, b: RowMark) => (below(a, b) ? b : a);

/** Rows of one chunk by name: one context id per row, rows of a context together, contexts in order. */
export class ChunkRowNames {
  constructor(private readonly contextIds: readonly number[]) {}

  /** Rows at the front of the chunk that lie below `mark`. */
  countBelow(mark: RowMark): number {
    const ids = this.contextIds;
    let offset = 0;
    for (let i = 0; i < ids.length; i++) {
      offset = i > 0 && ids[i] === ids[i - 1] ? offset + 1 : 0;
      if (!below({ context: ids[i]!, offset }, mark)) return i;
    }
    return ids.length;
  }

  /** The mark just after row `row` (its next row's name, or the next context's first row). */
  after(row: number): RowMark {
    const ids = this.contextIds;
    let offset = 0;
    for (let i = row; i > 0 && ids[i - 1] === ids[row]; i--) offset++;
    return { context: ids[row]!, offset: offset + 1 };
  }
}

/** What is kept of a producer's hook point: the mark claimed by chunks being placed, and the one committed. */
interface HookMark {
  /** Rows below it are being placed or answered: a copy arriving on another stream meanwhile is a duplicate. */
  claimed: RowMark;
  /** Rows below it are answered and in the ledger; this is what survives a restart. */
  committed: RowMark;
}

interface ProducerMarks {
  lineage: string;
  hooks: Map<string, HookMark>;
}

/** The saved form: per producer, its lineage and the committed mark of each hook point. */
export type SavedMarks = Record<string, { lineage: string; hooks: Record<string, RowMark> }>;

/**
 * The buffer's marks, per (producer, hook point). They survive a producer's new hello (a producer
 * that crashed re-sends what it had in flight and more), and the buffer's own restart (saved with
 * its ledger, else learnt from the producers' announcements).
 */
export class Marks {
  private readonly producers = new Map<string, ProducerMarks>();

  /** Producers known, by id. */
  get size(): number {
    return this.producers.size;
  }

  has(producerId: string): boolean {
    return this.producers.has(producerId);
  }

  /** Rows at the front of a chunk already claimed: duplicates. */
  duplicates(producerId: string, hookPoint: string, rows: ChunkRowNames): number {
    const mark = this.producers.get(producerId)?.hooks.get(hookPoint);
    return mark ? rows.countBelow(mark.claimed) : 0;
  }

  /** A chunk is being placed up to `end`: copies of it arriving meanwhile are duplicates. */
  claim(producerId: string, hookPoint: string, end: RowMark): void {
    const mark = this.hookMark(producerId, hookPoint);
    mark.claimed = later(mark.claimed, end);
  }

  /** Rows up to `end` are answered and counted in the ledger. */
  commit(producerId: string, hookPoint: string, end: RowMark): void {
    const mark = this.hookMark(producerId, hookPoint);
    mark.committed = later(mark.committed, end);
    mark.claimed = later(mark.claimed, end);
  }

  /**
   * A producer announced itself. Another lineage than the one known means it started its shard
   * afresh (its context ids name other rows now): what is known of it is forgotten. Its `answered`
   * marks, when given, are rows some buffer answered: a buffer that restarted without its state takes
   * them as committed.
   */
  adopt(producerId: string, lineage: string | undefined, answered: Record<string, number> = {}): void {
    let known = this.producers.get(producerId);
    if (known && lineage && known.lineage && known.lineage !== lineage) known = undefined;
    if (!known) this.producers.set(producerId, (known = { lineage: lineage ?? "", hooks: new Map() }));
    if (lineage) known.lineage = lineage;
    for (const [hookPoint, next] of Object.entries(answered)) this.commit(producerId, hookPoint, { context: next, offset: 0 });
  }

  save(): SavedMarks {
    const out: SavedMarks = {};
    for (const [id, p] of this.producers) {
      out[id] = { lineage: p.lineage, hooks: Object.fromEntries([...p.hooks].map(([h, m]) => [h, m.committed])) };
    }
    return out;
  }

  restore(saved: SavedMarks): void {
    for (const [id, p] of Object.entries(saved)) {
      const hooks = new Map(Object.entries(p.hooks).map(([h, m]) => [h, { claimed: m, committed: m }]));
      this.producers.set(id, { lineage: p.lineage, hooks });
    }
  }

  private hookMark(producerId: string, hookPoint: string): HookMark {
    let p = this.producers.get(producerId);
    if (!p) this.producers.set(producerId, (p = { lineage: "", hooks: new Map() }));
    let mark = p.hooks.get(hookPoint);
    if (!mark) p.hooks.set(hookPoint, (mark = { claimed: ORIGIN, committed: ORIGIN }));
    return mark;
  }
}
