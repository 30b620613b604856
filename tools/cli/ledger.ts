import type { RunStatus } from "./status.js";

/** Why rows of a valid chunk were not pooled (the buffer's refusals). */
const REFUSALS = ["duplicate", "non_finite", "pool_full", "draining"];
/** Why pooled rows left unserved: the pool of a buffer that died, or of one that stopped and was started again. */
const LOSSES = ["lost_with_buffer", "left_at_stop"];

/**
 * The run's row ledger for one hook point of one buffer shard, from the final statuses: what producers made, what the
 * buffer (across its restarts) accepted and refused, and where every accepted row went.
 *
 *   produced = accepted + refused other than duplicate   (a duplicate is a row sent again, not made again)
 *   accepted = served + held + lost
 */
export interface HookLedger {
  hookPoint: string;
  /** The buffer shard holding this pool (0 in a one-buffer run). */
  shard: number;
  /** Rows producers made for this hook point, each counted once, across their restarts. */
  produced: number;
  accepted: number;
  /** Rows the buffer did not pool, by reason; `duplicate` counts rows re-sent after a broken stream or a restart. */
  refused: Record<string, number>;
  /** Rows that left the pool after every consumer had them. */
  served: number;
  /** Rows still in the pool at the end. */
  held: number;
  /** Accepted rows that left without being served, by reason. */
  lost: Record<string, number>;
  /** produced = accepted + refused (duplicates aside). */
  producedReconciles: boolean;
  /** accepted = served + held + lost. */
  acceptedReconciles: boolean;
}

const sum = (r: Record<string, number>) => Object.values(r).reduce((a, b) => a + b, 0);

export function ledgerOf(st: RunStatus): HookLedger[] {
  const hooks = st.buffer.flatMap((b) => (b.status?.hookPoints ?? []).map((h) => ({ h, shard: b.status!.shard })));
  return hooks.map(({ h, shard }) => {
    const reasons = new Map(h.dropped.map((d) => [d.reason, Number(d.rows)]));
    const refused = Object.fromEntries(REFUSALS.map((r) => [r, reasons.get(r) ?? 0]));
    const lost = Object.fromEntries(LOSSES.map((r) => [r, reasons.get(r) ?? 0]));
    let produced = 0;
    // A producer sends a hook point's rows to one shard, and says how many it sent there (fewer than it
    // made once that shard ended while it fed others).
    for (const p of st.producers) {
      const feed = p.status?.feeds.find((f) => f.shard === shard);
      produced += Number(feed?.rowsSent[h.hookPoint] ?? 0n);
    }
    const accepted = Number(h.rowsIn);
    const served = Number(h.rowsOut);
    const held = Number(h.unconsumedRows);
    return {
      hookPoint: h.hookPoint,
      shard,
      produced,
      accepted,
      refused,
      served,
      held,
      lost,
      producedReconciles: produced === accepted + sum(refused) - refused.duplicate!,
      acceptedReconciles: accepted === served + held + sum(lost),
    };
  });
}

/** One line per hook point (of each shard, when there are several), for the end of `saeflow up`. */
export function ledgerLines(ledger: HookLedger[]): string[] {
  const sharded = ledger.some((l) => l.shard > 0);
  const total = (r: Record<string, number>) => {
    const parts = Object.entries(r).filter(([, n]) => n > 0);
    return `${sum(r)}${parts.length ? ` (${parts.map(([k, n]) => `${k} ${n}`).join(", ")})` : ""}`;
  };
  return ledger.map((l) => {
    const { duplicate, ...refused } = l.refused;
    const resent = duplicate ? `; ${duplicate} rows sent again were recognised as duplicates` : "";
    const bad = (ok: boolean) => (ok ? "" : " (DOES NOT RECONCILE)");
    return (
      `${sharded ? `shard ${l.shard} ` : ""}${l.hookPoint}: produced ${l.produced} = accepted ${l.accepted} + refused ${total(refused)}${bad(l.producedReconciles)}; ` +
      `accepted = served ${l.served} + held ${l.held} + lost ${total(l.lost)}${bad(l.acceptedReconciles)}${resent}`
    );
  });
}
