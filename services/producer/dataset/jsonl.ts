/**
 * The text of one JSONL record, or why it has none. A dataset with a few broken records should not
 * stop a long run, so the reader logs and skips them; they take no document index, which keeps the
 * numbering the same for every producer.
 */
export function textOfRecord(line: string, field: string): string | { error: string } {
  let record: unknown;
  try {
    record = JSON.parse(line);
  } catch (err) {
    return { error: `not JSON (${(err as Error).message})` };
  }
  if (typeof record !== "object" || record === null || Array.isArray(record)) return { error: "not a JSON object" };
  const text = (record as Record<string, unknown>)[field];
  if (typeof text !== "string") return { error: `no string field "${field}" (producer.textField)` };
  return text;
}
