import type { Cursor } from "./position.js";
import type { Encoded } from "./ahead.js";

export interface PackOptions {
  contextLength: number;
  prependBos: boolean;
  excludeBos: boolean;
  /** BOS id; undefined for tokenizers without one (then prependBos must be false). */
  bosId: number | undefined;
  padId: number;
}

/** One packed context of exactly contextLength positions. */
export interface Context {
  /** Producer-wide context counter, carried in chunks as context_ids. */
  id: number;
  tokens: number[];
  /** Positions before `length` are real; the rest are padding (masked, never sent). */
  length: number;
  /** Per position: 1 when its activation is sent (not BOS when excludeBos, not padding). */
  keep: Uint8Array;
  /** Per position: dataset-wide index of the document the token came from. */
  documentIds: Uint32Array;
  /** Where the token stream continues after this context: the resume point once it is delivered. */
  end: Cursor;
  /** Shard documents fully packed once this context is complete. */
  documentsDone: number;
}

export interface PackState {
  cursor: Cursor;
  contexts: number;
  documentsDone: number;
}

/**
 * Packs the token stream of a shard into fixed-length contexts, as SAELens does by default: each
 * context starts with BOS (when prependBos) and documents are joined with a BOS separator, so the
 * model sees where one document ends. A context may start mid-document. The last context of an
 * epoch is padded rather than dropped.
 *
 * Resuming from a context's `end` cursor yields exactly the contexts that would have followed it.
 * `documents` (already tokenized, see encodeAhead) must start at the cursor's document, whose first
 * `tokenOffset` tokens are skipped.
 */
export async function* packContexts(documents: AsyncIterable<Encoded>, options: PackOptions, state: PackState): AsyncGenerator<Context> {
  const L = options.contextLength;
  const bosKeep = options.excludeBos ? 0 : 1;
  let contexts = state.contexts;
  let documentsDone = state.documentsDone;
  let ctx: Context | undefined;
  let bodyStart = 0;

  const open = (doc: number): Context => {
    const c: Context = {
      id: contexts++,
      tokens: [],
      length: 0,
      keep: new Uint8Array(L),
      documentIds: new Uint32Array(L),
      end: state.cursor,
      documentsDone,
    };
    if (options.prependBos) push(c, options.bosId!, bosKeep, doc);
    bodyStart = c.tokens.length;
    return c;
  };
  function push(c: Context, token: number, keep: number, doc: number): void {
    c.keep[c.tokens.length] = keep;
    c.documentIds[c.tokens.length] = doc;
    c.tokens.push(token);
    c.length = c.tokens.length;
  }
  const finish = (c: Context, end: Cursor): Context => ({ ...c, end, documentsDone });

  for await (const { doc, ids } of documents) {
    if (!ids.length) {
      documentsDone++;
      continue;
    }
    const first = doc.index === state.cursor.documentIndex ? state.cursor.tokenOffset : 0;
    const at = (tokenOffset: number): Cursor => ({
      epoch: state.cursor.epoch,
      fileIndex: doc.fileIndex,
      offset: doc.offset,
      documentIndex: doc.index,
      tokenOffset,
    });
    for (let t = first; t < ids.length; t++) {
      if (!ctx) {
        ctx = open(doc.index);
      } else if (t === 0 && ctx.tokens.length > bodyStart && options.bosId !== undefined) {
        push(ctx, options.bosId, bosKeep, doc.index);
        if (ctx.tokens.length === L) {
          yield finish(ctx, at(0));
          ctx = open(doc.index);
        }
      }
      push(ctx, ids[t]!, 1, doc.index);
      if (t + 1 === ids.length) documentsDone++;
      if (ctx.tokens.length === L) {
        yield finish(ctx, at(t + 1));
        ctx = undefined;
      }
    }
  }
  if (ctx) {
    const tail = ctx;
    while (tail.tokens.length < L) tail.tokens.push(options.padId);
    yield finish(tail, { epoch: state.cursor.epoch + 1, fileIndex: 0, offset: 0, documentIndex: 0, tokenOffset: 0 });
  }
}
