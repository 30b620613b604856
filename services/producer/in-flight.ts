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
}

const chunkKey = (chunk: ActivationChunk) => `${chunk.hookPoint}#${chunk.sequence}`;

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

  constructor(
    private readonly store: PositionStore,
    private position: Position,
  ) {
    this.sentContexts = position.contexts;
  }

  /** How far this producer's contexts have gone, per hook point, for its announcements (see docs/nats.md). */
  marks(hookPoints: readonly string[]): Record<string, HookMarks> {
    const mark = { sent: this.sentContexts, answered: this.position.contexts };
    return Object.fromEntries(hookPoints.map((h) => [h, mark]));
  }

  /** The position up to which every chunk was answered. */
  get delivered(): Position {
    return this.position;
  }

  /** Records a pass whose `chunks` are about to be sent; once they are all answered, `position` is delivered. */
  opened(position: Position, chunks: readonly ActivationChunk[]): void {
    const pass: Pass = { position, unanswered: chunks.length };
    this.sentContexts = Math.max(this.sentContexts, position.contexts);
    this.passes.push(pass);
    for (const chunk of chunks) this.passOf.set(chunkKey(chunk), pass);
    this.settle();
  }

  /** The buffer answered `chunk` (accepted or refused: either way it is not sent again). */
  answered(chunk: ActivationChunk): void {
    const key = chunkKey(chunk);
    const pass = this.passOf.get(key);
    this.passOf.delete(key);
    if (pass) pass.unanswered--;
    this.settle();
  }

  /** The shard is done and every pass answered: the saved position says so. */
  exhausted(): void {
    this.position = { ...this.position, exhausted: true };
    this.save();
  }

  /** Writes the delivered position now. */
  save(): void {
    this.store.save(this.position);
    this.lastSave = Date.now();
  }

  private settle(): void {
    while (this.passes.length && this.passes[0]!.unanswered === 0) this.position = this.passes.shift()!.position;
    if (Date.now() - this.lastSave >= SAVE_EVERY_MS) this.save();
  }
}
