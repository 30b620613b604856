/**
 * A wake-up for async loops waiting on pool state (rows added, space freed, state changed). Waiters
 * re-check their condition after each wake, and check-then-wait happens in one synchronous turn, so
 * no notify is lost.
 */
export class Signal {
  private waiters: Array<() => void> = [];

  notify(): void {
    const waiters = this.waiters;
    this.waiters = [];
    for (const wake of waiters) wake();
  }

  /** Resolves true on the next notify(), false when `abort` fires or `timeoutMs` passes first. */
  wait(abort?: AbortSignal, timeoutMs?: number): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      if (abort?.aborted) return resolve(false);
      let timer: NodeJS.Timeout | undefined;
      const finish = (notified: boolean): void => {
        clearTimeout(timer);
        abort?.removeEventListener("abort", onAbort);
        resolve(notified);
      };
      const wake = (): void => finish(true);
      const onAbort = (): void => {
        this.waiters = this.waiters.filter((w) => w !== wake);
        finish(false);
      };
      this.waiters.push(wake);
      abort?.addEventListener("abort", onAbort, { once: true });
      if (timeoutMs !== undefined) timer = setTimeout(onAbort, timeoutMs);
    });
  }
}
