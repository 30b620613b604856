/**
 * The one wake-up for async code waiting on state that changes elsewhere (rows added, a grant, a
 * resume). Waiters re-check their condition after each wake, and a check followed by wait() runs in
 * one synchronous turn, so no notify is lost between them.
 */
export class Signal {
  private waiters: Array<() => void> = [];

  /** Wakes every current waiter. */
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

  /** Resolves true once `ready()` holds (checked now and after every notify), false if `abort` fires first. */
  async until(ready: () => boolean, abort?: AbortSignal): Promise<boolean> {
    while (!ready()) if (!(await this.wait(abort))) return ready();
    return true;
  }
}
