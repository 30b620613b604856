import type { Batch, BatchSource } from "./batches.js";

/**
 * One hook point's batches from every buffer shard holding it: each shard's source is asked for
 * its next batch ahead, and next() takes whichever answers first, so a slow or restarting shard
 * does not hold back the others' rows. A shard whose source ends (drained) drops out; the merge
 * ends once all have. A source that fails fails the merge (each rides through a broken stream on
 * its own, see prefetch-worker.ts, and gives up only past buffer.trainerAwayMs).
 */
export class MergedBatches implements BatchSource {
  /** Each live source's outstanding next(), settled or not; none while its last batch waits to be taken. */
  private readonly ahead = new Map<BatchSource, Promise<{ from: BatchSource; batch: Batch | undefined }>>();
  private readonly live: BatchSource[];
  /** Where the next look starts, so that shards with batches ready take turns. */
  private turn = 0;
  private closed = false;

  constructor(private readonly sources: readonly BatchSource[]) {
    this.live = [...sources];
  }

  private ask(from: BatchSource): Promise<{ from: BatchSource; batch: Batch | undefined }> {
    let pending = this.ahead.get(from);
    if (!pending) {
      pending = from.next().then((batch) => ({ from, batch }));
      // A failure is seen when next() races it; a source dropped meanwhile must not warn unhandled.
      pending.catch(() => undefined);
      this.ahead.set(from, pending);
    }
    return pending;
  }

  async next(): Promise<Batch | undefined> {
    while (!this.closed && this.live.length > 0) {
      const start = this.turn++ % this.live.length;
      const order = [...this.live.slice(start), ...this.live.slice(0, start)];
      // Promise.race settles on the first already-settled entry in order, so the rotation shares turns.
      const { from, batch } = await Promise.race(order.map((s) => this.ask(s)));
      this.ahead.delete(from);
      if (this.closed) return undefined;
      if (batch) return batch;
      this.live.splice(this.live.indexOf(from), 1);
    }
    return undefined;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.sources) s.close();
  }
}
