/** What a document is made of: text for the tokenizer, or token ids a tokenizer made earlier. */
export type Body = { text: string; ids?: undefined } | { ids: number[]; text?: undefined };

/** Where a record's token ids are, and the bound every id must stay below. */
export interface TokenIds {
  field: string;
  vocabSize: number;
}

/** The first entry of `value` that is not a token id below `vocabSize`, as a message; undefined when all are. */
function badId(value: unknown[], vocabSize: number): string | undefined {
  for (let i = 0; i < value.length; i++) {
    const id = value[i];
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0 || id >= vocabSize)
      return `holds ${JSON.stringify(id)} at position ${i}, not a token id below the tokenizer's vocabulary size ${vocabSize}`;
  }
  return undefined;
}

/**
 * The body of one JSONL record, or why it has none: its token ids when `tokens` says where they
 * are, else its text. A dataset with a few broken records should not stop a long run, so the reader
 * logs and skips them; they take no document index, which keeps the numbering the same for every
 * producer. An id the model has no embedding for is such a break: it would fail the forward pass.
 */
export function bodyOfRecord(line: string, textField: string, tokens: TokenIds | undefined): Body | { error: string } {
  let record: unknown;
  try {
    record = JSON.parse(line);
  } catch (err) {
    return { error: `not JSON (${(err as Error).message})` };
  }
  if (typeof record !== "object" || record === null || Array.isArray(record)) return { error: "not a JSON object" };
  if (tokens) {
    const ids: unknown = (record as Record<string, unknown>)[tokens.field];
    if (!Array.isArray(ids)) return { error: `no array field "${tokens.field}" (producer.tokensField)` };
    const bad = badId(ids, tokens.vocabSize);
    if (bad) return { error: `"${tokens.field}" ${bad} (producer.tokensField)` };
    return { ids: ids as number[] };
  }
  const text = (record as Record<string, unknown>)[textField];
  if (typeof text !== "string") return { error: `no string field "${textField}" (producer.textField)` };
  return { text };
}
