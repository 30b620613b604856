import type { Instruments } from "./instruments.js";

export const DROP_REASONS = ["duplicate", "non_finite", "pool_full", "draining"] as const;
export type DropReason = (typeof DROP_REASONS)[number];

/** The ledger's identity at one moment: received = served + held + dropped. */
export interface Balance {
  /** Rows of chunks that passed the checks. */
  received: number;
  /** Rows that left the pool after every consumer had them (a row sent to two fan-out trainers counts once). */
  served: number;
  held: number;
  dropped: number;
  reconciles: boolean;
}

/**
 * Row ledger of one hook point. Every row of a chunk that passed the checks is either pooled or
 * dropped with a reason; every pooled row is either still held or has been served. Chunks refused
 * for their shape are not in the ledger (their row count is not to be trusted): a metric counts them.
 */
export class Accounting {
  rowsIn = 0;
  rowsOut = 0;
  readonly dropped: Record<DropReason, number> = { duplicate: 0, non_finite: 0, pool_full: 0, draining: 0 };
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

  get droppedRows(): number {
    return DROP_REASONS.reduce((sum, r) => sum + this.dropped[r], 0);
  }

  balance(held: number): Balance {
    const dropped = this.droppedRows;
    const received = this.rowsIn + dropped;
    return { received, served: this.rowsOut, held, dropped, reconciles: received === this.rowsOut + held + dropped };
  }
}
