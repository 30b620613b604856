import type { HookMarks } from "../common/coordination.js";
import type { ActivationChunk } from "../gen/saeflow/buffer/v1/buffer_pb.js";
import type { Position, PositionStore } from "./dataset/position.js";

/**
 * The position file is rewritten at most this often while running (and always when asked): what a
 * restarted producer makes again (and the buffer refuses as duplicates) is what was answered since.
 */
const SAVE_EVERY_MS = 200;

/** A forward pass whose chunks are out: the position it completes and the answers it still awaits. */
interface Pass {
  position: Position;
  unanswered: number;
  /**
   * Rows of its chunks written at least once, by chunk (one re-sent after a broken stream is not made
   * twice): what the pass adds to each hook point's count (a shard that ended meanwhile gets none).
   */
  written: Map<string, number>;
}

const chunkKey = (chunk: ActivationChunk) => `${chunk.hookPoint}#${chunk.sequence}`;
const hookOf = (key: string) => key.slice(0, key.lastIndexOf("#"));

/**
 * The passes whose chunks are out, oldest first. A pass's position is delivered once all of its
 * chunks and all earlier passes are answered, so a restarted producer regenerates at most what was
 * in flight. The delivered position is saved at most once a second while answers come in.
 */
export class InFlightLedger {
  private readonly passes: Pass[] = [];
  private readonly passOf = new Map<string, Pass>();
  private lastSave = 0;
  /** Next context id after the last pass sent (or about to be): how far the contexts have gone out. */
  private sentContexts: number;
  /** Hook points whose buffer shard ended: their chunks are not sent, so no pass waits for them. */
  private readonly ended = new Set<string>();
  /** Rows of chunks written to a shard that ended before answering them, by chunk: produced only if an answer still comes. */
  private readonly late = new Map<string, number>();

  /**
   * `hookPoints` are the producer's: a position saved before per-hook counts sent every pass to all
   * of them.
   */
  constructor(
    private readonly store: PositionStore,
    private position: Position,
    hookPoints: readonly string[],
  ) {
    this.sentContexts = position.contexts;
    for (const hook of position.endedHooks ?? []) this.ended.add(hook);
    const hooks = Object.fromEntries(hookPoints.map((h) => [h, position.produced.hooks?.[h] ?? position.produced.rows]));
    this.position = { ...position, produced: { ...position.produced, hooks } };
  }

  /**
   * How far this producer's contexts have gone, per hook point, for its announcements (see docs/nats.md).
   * None for a hook point whose shard ended: the passes delivered since did not wait for its answers,
   * and a shard taking them as answered would call a chunk re-sent to it a duplicate it never had.
   */
  marks(hookPoints: readonly string[]): Record<string, HookMarks> {
    const mark = { sent: this.sentContexts, answered: this.position.contexts };
    return Object.fromEntries(hookPoints.filter((h) => !this.ended.has(h)).map((h) => [h, mark]));
  }

  /** The position up to which every chunk was answered. */
  get delivered(): Position {
    return this.position;
  }

  /** Records a pass whose `chunks` are about to be sent; once they are all answered, `position` is delivered. */
  opened(position: Position, chunks: readonly ActivationChunk[]): void {
    const awaited = chunks.filter((c) => !this.ended.has(c.hookPoint));
    const pass: Pass = { position, unanswered: awaited.length, written: new Map() };
    this.sentContexts = Math.max(this.sentContexts, position.contexts);
    this.passes.push(pass);
    for (const chunk of awaited) this.passOf.set(chunkKey(chunk), pass);
    this.settle();
  }

  /**
   * `chunk` of an opened pass is being written to its stream, before any answer to it can come: its
   * rows count as produced for its hook point once the pass is delivered, once however often it is
   * re-sent (a re-sent row the buffer had is answered as a duplicate, which the ledger sets aside). A chunk of a shard that
   * ended before it went out is never written, and one written but not answered when it ended counts
   * only if its answer still comes, so what a shard is said to have been sent is what it answered
   * (accepted or refused), and its ledger reconciles.
   */
  sending(chunk: ActivationChunk): void {
    const key = chunkKey(chunk);
    const pass = this.passOf.get(key);
    if (!pass || pass.written.has(key)) return;
    pass.written.set(key, chunk.activations?.shape[0] ?? 0);
  }

  /** The buffer answered `chunk` (accepted or refused: either way it is not sent again). */
  answered(chunk: ActivationChunk): void {
    const key = chunkKey(chunk);
    const late = this.late.get(key);
    if (late !== undefined) {
      this.late.delete(key);
      const hooks = { ...this.position.produced.hooks };
      hooks[chunk.hookPoint] = (hooks[chunk.hookPoint] ?? 0) + late;
      this.position = { ...this.position, produced: { ...this.position.produced, hooks } };
      // A restart makes nothing again for a shard that ended, so the count is kept at once.
      this.save();
    }
    const pass = this.passOf.get(key);
    this.passOf.delete(key);
    if (pass) pass.unanswered--;
    this.settle();
  }

  /**
   * The buffer shard holding `hookPoints` for this producer ended (its trainers are done, or it was
   * drained): later chunks of theirs are not sent, and passes stop waiting for the answers still due
   * (they may never come: its stream may be down), so the position goes on with the shards still
   * fed. Rows of those chunks count as produced when an answer comes after all.
   */
  endHooks(hookPoints: readonly string[]): void {
    for (const hook of hookPoints) this.ended.add(hook);
    for (const [key, pass] of this.passOf) {
      if (!hookPoints.includes(hookOf(key))) continue;
      this.passOf.delete(key);
      pass.unanswered--;
      // Written and unanswered: the stream may be down and never reach the shard again.
      const rows = pass.written.get(key);
      if (rows !== undefined) {
        pass.written.delete(key);
        this.late.set(key, rows);
      }
    }
    this.settle();
    // Saved at once: a producer restarted later must not wait for a shard that is gone.
    this.save();
  }

  /** Chunks written to shards that ended and not answered (yet): their rows are not counted as produced. */
  get unansweredLate(): number {
    return this.late.size;
  }

  /** True when every one of `hookPoints` had its shard end before this start (the saved position says so). */
  endedBefore(hookPoints: readonly string[]): boolean {
    return hookPoints.every((h) => this.ended.has(h));
  }

  /** The shard is done and every pass answered: the saved position says so. */
  exhausted(): void {
    this.position = { ...this.position, exhausted: true };
    this.save();
  }

  /** Writes the delivered position now. */
  save(): void {
    this.store.save(this.ended.size ? { ...this.position, endedHooks: [...this.ended] } : this.position);
    this.lastSave = Date.now();
  }

  private settle(): void {
    while (this.passes.length && this.passes[0]!.unanswered === 0) {
      const pass = this.passes.shift()!;
      const hooks = { ...this.position.produced.hooks };
      for (const [key, rows] of pass.written) hooks[hookOf(key)] = (hooks[hookOf(key)] ?? 0) + rows;
      this.position = { ...pass.position, produced: { ...pass.position.produced, hooks } };
    }
    if (Date.now() - this.lastSave >= SAVE_EVERY_MS) this.save();
  }
}
