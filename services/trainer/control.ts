import { Signal } from "../common/signal.js";
import { ServiceState } from "../gen/saeflow/v1/control_pb.js";

/**
 * Run control of a training run: its lifecycle state, and pause, resume and stop as the control
 * RPCs and signals ask for them. The loop waits here between steps while paused.
 */
export class RunControl {
  private current = ServiceState.STARTING;
  private paused = false;
  private stopping = false;
  private readonly changed = new Signal();

  get state(): ServiceState {
    return this.current;
  }

  /** A stop was asked: the loop ends after the step in flight. */
  get stopAsked(): boolean {
    return this.stopping;
  }

  /** Training began: running, or paused when a pause came while it started. */
  started(): void {
    this.current = this.paused ? ServiceState.PAUSED : ServiceState.RUNNING;
  }

  /** Training is over; the last checkpoint and export are being written. */
  draining(): void {
    this.current = ServiceState.DRAINING;
  }

  stopped(): void {
    this.current = ServiceState.STOPPED;
  }

  /** Holds the loop before its next step; a pause while starting takes effect once it runs. */
  pause(): ServiceState {
    if (this.current === ServiceState.RUNNING || this.current === ServiceState.STARTING) {
      this.paused = true;
      if (this.current === ServiceState.RUNNING) this.current = ServiceState.PAUSED;
    }
    return this.current;
  }

  resume(): ServiceState {
    if (this.paused) {
      this.paused = false;
      if (this.current === ServiceState.PAUSED) this.current = ServiceState.RUNNING;
      this.changed.notify();
    }
    return this.current;
  }

  /** Asks the loop to end after the step in flight, paused or not. */
  stop(): void {
    this.stopping = true;
    this.changed.notify();
  }

  /** Resolves once the run is not paused, or a stop was asked. */
  async unpaused(): Promise<void> {
    await this.changed.until(() => !this.paused || this.stopping);
  }
}
