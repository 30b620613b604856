/**
 * Runs `body` with `handler` answering SIGINT and SIGTERM in place of Node's default (exit at once),
 * and gives the signals back however `body` ends: an error during start must not leave a handler
 * that swallows the next Ctrl-C.
 */
export async function handlingSignals<T>(handler: (signal: NodeJS.Signals) => void, body: () => Promise<T>): Promise<T> {
  const signals = ["SIGINT", "SIGTERM"] as const;
  for (const signal of signals) process.on(signal, handler);
  try {
    return await body();
  } finally {
    for (const signal of signals) process.off(signal, handler);
  }
}
