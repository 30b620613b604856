import type { Instruments } from "./instruments.js";

/** Why rows of a valid chunk were not pooled. */
export const REFUSAL_REASONS = ["duplicate", "non_finite", "pool_full", "draining"] as const;
export type RefusalReason = (typeof REFUSAL_REASONS)[number];

/**
 * Why pooled rows left without being served: the pool of a buffer that died (`lost_with_buffer`), or
 * of one that stopped cleanly with rows in it and was started again (`left_at_stop`). Counted when
 * the next buffer of the run reads its predecessor's ledger.
 */
export const LOSS_REASONS = ["lost_with_buffer", "left_at_stop"] as const;
export type LossReason = (typeof LOSS_REASONS)[number];

/** Status reports refusals and losses in one list of reasons (its `dropped`); the names tell them apart. */
export const DROP_REASONS = [...REFUSAL_REASONS, ...LOSS_REASONS] as const;
export type DropReason = (typeof DROP_REASONS)[number];

/** The ledger's identities at one moment: received = accepted + refused, accepted = served + held + lost. */
export interface Balance {
  /** Rows of chunks that passed the checks. */
  received: number;
  accepted: number;
  refused: number;
  /** Rows that left the pool after every consumer had them (a row sent to two fan-out trainers counts once). */
  served: number;
  held: number;
  lost: number;
  reconciles: boolean;
}

/** The counters a ledger is made of, as saved and restored across a buffer's restart. */
export interface LedgerCounts {
  rowsIn: number;
  rowsOut: number;
  dropped: Partial<Record<DropReason, number>>;
}

/**
 * Row ledger of one hook point, for the whole run (a restarted buffer goes on from its predecessor's,
 * see state-file.ts). Every row of a chunk that passed the checks is either pooled or refused with a
 * reason; every pooled row is served, still held, or lost with a reason. Chunks refused for their
 * shape are not in the ledger (their row count is not to be trusted): a metric counts them.
 */
export class Accounting {
  rowsIn = 0;
  rowsOut = 0;
  readonly dropped: Record<DropReason, number> = {
    duplicate: 0,
    non_finite: 0,
    pool_full: 0,
    draining: 0,
    lost_with_buffer: 0,
    left_at_stop: 0,
  };
  private readonly attributes: { hook_point: string };

  constructor(
    hookPoint: string,
    private readonly instruments: Instruments,
  ) {
    this.attributes = { hook_point: hookPoint };
  }

  pooled(rows: number): void {
    this.rowsIn += rows;
    this.instruments.rowsIn.add(rows, this.attributes);
  }

  served(rows: number): void {
    if (rows === 0) return;
    this.rowsOut += rows;
    this.instruments.rowsOut.add(rows, this.attributes);
  }

  drop(reason: DropReason, rows: number): void {
    if (rows === 0) return;
    this.dropped[reason] += rows;
    this.instruments.rowsDropped.add(rows, { ...this.attributes, reason });
  }

  /** Takes over the counts of the buffer this one replaces; the rows it held are gone, for `reason`. */
  restore(counts: LedgerCounts, held: number, reason: LossReason): void {
    this.rowsIn = counts.rowsIn;
    this.rowsOut = counts.rowsOut;
    for (const r of DROP_REASONS) this.dropped[r] = counts.dropped[r] ?? 0;
    this.dropped[reason] += held;
  }

  counts(): LedgerCounts & { dropped: Record<DropReason, number> } {
    return { rowsIn: this.rowsIn, rowsOut: this.rowsOut, dropped: { ...this.dropped } };
  }

  balance(held: number): Balance {
    const refused = REFUSAL_REASONS.reduce((sum, r) => sum + this.dropped[r], 0);
    const lost = LOSS_REASONS.reduce((sum, r) => sum + this.dropped[r], 0);
    return {
      received: this.rowsIn + refused,
      accepted: this.rowsIn,
      refused,
      served: this.rowsOut,
      held,
      lost,
      reconciles: this.rowsIn === this.rowsOut + held + lost,
    };
  }
}
