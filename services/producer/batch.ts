import type { Context } from "./dataset/pack.js";
import { keptSpans, type Spans } from "./convert.js";
import type { ForwardInputs } from "./session.js";

/** The contexts of one forward pass, as model inputs plus the ids of the rows that will be sent. */
export interface Batch {
  contexts: Context[];
  inputs: ForwardInputs;
  /** Kept positions over the flattened [batch, length], in runs. */
  spans: Spans;
  rows: number;
  /** Real (non-padding) tokens run through the model. */
  tokens: number;
  tokenIds: number[];
  contextIds: number[];
  documentIds: number[];
}

export function makeBatch(contexts: Context[], length: number): Batch {
  const n = contexts.length * length;
  const inputIds = new BigInt64Array(n);
  const attentionMask = new BigInt64Array(n);
  const positionIds = new BigInt64Array(n);
  const keep = new Uint8Array(n);
  const tokenIds: number[] = [];
  const contextIds: number[] = [];
  const documentIds: number[] = [];
  let tokens = 0;
  contexts.forEach((ctx, b) => {
    const base = b * length;
    tokens += ctx.length;
    for (let p = 0; p < length; p++) {
      inputIds[base + p] = BigInt(ctx.tokens[p]!);
      // Packed contexts restart positions at 0 like the model's training sequences; padding is masked.
      positionIds[base + p] = BigInt(p);
      attentionMask[base + p] = p < ctx.length ? 1n : 0n;
      if (!ctx.keep[p]) continue;
      keep[base + p] = 1;
      tokenIds.push(ctx.tokens[p]!);
      contextIds.push(ctx.id);
      documentIds.push(ctx.documentIds[p]!);
    }
  });
  return {
    contexts,
    inputs: { batch: contexts.length, length, inputIds, attentionMask, positionIds },
    spans: keptSpans(keep),
    rows: tokenIds.length,
    tokens,
    tokenIds,
    contextIds,
    documentIds,
  };
}
