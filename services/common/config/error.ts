/** One bad key: where it is, what is wrong, and where its value came from (a file, env, --set). */
export interface ConfigIssue {
  key: string;
  message: string;
  source?: string;
}

/**
 * A config that does not hold, from the schema or from a check only a role can make (a model file,
 * a buffer's pool). One line per key, each naming the key and, when known, where its value came from.
 */
export class ConfigError extends Error {
  readonly issues: readonly ConfigIssue[];

  constructor(issues: ConfigIssue[]) {
    const line = (i: ConfigIssue) => `${i.key}: ${i.message}${i.source ? ` (from ${i.source})` : ""}`;
    super(issues.length === 1 ? line(issues[0]!) : `invalid config:\n${issues.map((i) => `  ${line(i)}`).join("\n")}`);
    this.name = "ConfigError";
    this.issues = issues;
  }

  /** The keys at fault, in order. */
  get keys(): string[] {
    return this.issues.map((i) => i.key);
  }

  /** The one factory for a single bad key. */
  static at(key: string, message: string, source?: string): ConfigError {
    return new ConfigError([{ key, message, ...(source ? { source } : {}) }]);
  }
}
