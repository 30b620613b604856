/** What a document is made of: text for the tokenizer, or token ids a tokenizer made earlier. */
export type Body = { text: string; ids?: undefined } | { ids: number[]; text?: undefined };

/** Where a record's token ids are, the bound every id must stay below, and the settings a skip names. */
export interface TokenIds {
  field: string;
  vocabSize: number;
  /** The settings that say where ids are and which tokenizer made them: config keys, or a CLI's flags. */
  keys: { tokensField: string; tokenizer: string };
}

/** The first entry of `ids` that is not a token id below the vocabulary size, as a message naming the setting at fault; undefined when all are. */
function badId(ids: unknown[], tokens: TokenIds): string | undefined {
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i];
    if (typeof id !== "number" || !Number.isInteger(id) || id < 0)
      return `"${tokens.field}" holds ${JSON.stringify(id)} at position ${i}, not a token id (${tokens.keys.tokensField})`;
    // Whole ids past the vocabulary are most likely another tokenizer's.
    if (id >= tokens.vocabSize)
      return `"${tokens.field}" holds ${id} at position ${i}, past the vocabulary of ${tokens.vocabSize} ids (made by another tokenizer than ${tokens.keys.tokenizer}?)`;
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
    if (!Array.isArray(ids)) return { error: `no array field "${tokens.field}" (${tokens.keys.tokensField})` };
    const bad = badId(ids, tokens);
    if (bad) return { error: bad };
    return { ids: ids as number[] };
  }
  const text = (record as Record<string, unknown>)[textField];
  if (typeof text !== "string") return { error: `no string field "${textField}" (producer.textField)` };
  return { text };
}
