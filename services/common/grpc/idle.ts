/**
 * The idle timer of one stream. It runs only while the server waits on its peer (for the next
 * request, or for the peer to read what was written) and starts over whenever a message moves, so a
 * handler that waits for its own reasons (an empty pool, a full one) is never idle. One timer per
 * stream, re-armed only when it fires: a message costs a clock read, not a timer.
 */
export class IdleWatch {
  private waits = 0;
  private since = 0;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    readonly ms: number,
    private readonly onIdle: () => void,
  ) {}

  /** The server now waits on the peer; call the result once the wait is over (a message moved, or the call ended). */
  begin(): () => void {
    this.waits++;
    this.moved();
    let over = false;
    return () => {
      if (over) return;
      over = true;
      this.waits--;
      this.moved();
    };
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private moved(): void {
    this.since = performance.now();
    if (this.waits > 0 && !this.timer && !this.stopped) this.arm(this.ms);
  }

  private arm(ms: number): void {
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.stopped || this.waits === 0) return;
      const left = this.since + this.ms - performance.now();
      if (left > 0) return this.arm(left);
      this.stop();
      this.onIdle();
    }, ms);
    this.timer.unref();
  }
}
