import { Signal } from "../../common/signal.js";
import type { Document } from "./sources.js";

/** A document with its token ids, encoded ahead of need. */
export interface Encoded {
  doc: Document;
  ids: number[];
}

export interface AheadOptions {
  /** Documents read and being (or done) encoding ahead of the consumer, at most. */
  documents: number;
  /** Characters of text ahead of the consumer, at most (bounds memory for long documents); a given id counts as CHARS_PER_ID. */
  chars: number;
  /** Characters per tokenizer call: documents are encoded in batches of about this much text. */
  batchChars: number;
}

export const DEFAULT_AHEAD: AheadOptions = { documents: 4096, chars: 4 << 20, batchChars: 32 << 10 };

/** About what one token takes as text, so that documents given as ids are bounded alike. */
const CHARS_PER_ID = 4;
const weight = (doc: Document): number => (doc.ids ? doc.ids.length * CHARS_PER_ID : doc.text.length);

/** Documents whose ids one tokenizer call is computing. */
interface Pending {
  docs: Document[];
  ids: Promise<number[][]>;
}

/**
 * The shard's documents with their ids, in order, tokenized ahead: a background pump reads
 * documents and hands them to the tokenizer in batches (one native call each, off the event loop)
 * while the consumer is busy elsewhere, so tokenization leaves the critical path. Documents that
 * come with their ids (pretokenized) pass by the tokenizer. Bounded by documents and characters.
 * Leaving early stops the pump and the document reader.
 */
export async function* encodeAhead(
  documents: AsyncIterable<Document>,
  encode: (texts: readonly string[]) => Promise<number[][]>,
  options: AheadOptions = DEFAULT_AHEAD,
): AsyncGenerator<Encoded> {
  const queue: Pending[] = [];
  const changed = new Signal();
  let held = { documents: 0, chars: 0 };
  let done = false;
  let failure: unknown;
  let stopped = false;
  const iterator = documents[Symbol.asyncIterator]();
  const room = () => held.documents < options.documents && held.chars < options.chars;

  const send = (docs: Document[], chars: number): void => {
    if (docs.length === 0) return;
    const texts = docs.flatMap((d) => (d.ids ? [] : [d.text]));
    const encoded = texts.length ? encode(texts) : Promise.resolve([]);
    const ids = encoded.then((fresh) => {
      let next = 0;
      return docs.map((d) => d.ids ?? fresh[next++]!);
    });
    ids.catch(() => undefined); // surfaced to the consumer when it reaches these documents
    queue.push({ docs, ids });
    held = { documents: held.documents + docs.length, chars: held.chars + chars };
    changed.notify();
  };
  const pump = async (): Promise<void> => {
    let docs: Document[] = [];
    let chars = 0;
    try {
      while (!stopped) {
        // A partial batch goes out as soon as the consumer has nothing left to read.
        if (docs.length && (!room() || queue.length === 0)) [docs, chars] = [(send(docs, chars), []), 0];
        await changed.until(() => stopped || room());
        if (stopped) break;
        const next = await iterator.next();
        if (next.done) break;
        docs.push(next.value);
        chars += weight(next.value);
        if (chars >= options.batchChars) [docs, chars] = [(send(docs, chars), []), 0];
      }
      if (!stopped) send(docs, chars);
    } catch (err) {
      failure = err;
    } finally {
      done = true;
      changed.notify();
    }
  };
  const pumping = pump();

  try {
    for (;;) {
      await changed.until(() => queue.length > 0 || done);
      const head = queue.shift();
      if (!head) {
        if (failure !== undefined) throw failure;
        return;
      }
      const ids = await head.ids;
      held = { documents: held.documents - head.docs.length, chars: held.chars - head.docs.reduce((n, d) => n + weight(d), 0) };
      changed.notify();
      for (const [i, doc] of head.docs.entries()) yield { doc, ids: ids[i]! };
    }
  } finally {
    stopped = true;
    changed.notify();
    await pumping;
    await iterator.return?.();
  }
}
