/** Learning-rate and coefficient schedules, as functions of the 0-based step being taken. */

export interface LrSchedule {
  peak: number;
  steps: number;
  warmupSteps: number;
  decay: "none" | "linear" | "cosine";
  /** Fraction of `steps` after which the decay to 0 begins. */
  decayStart: number;
}

/** Linear warm-up from 0, flat at the peak, then a linear or cosine decay toward 0 by the last step. */
export function learningRate(s: LrSchedule, step: number): number {
  const warm = s.warmupSteps > 0 ? Math.min(1, (step + 1) / s.warmupSteps) : 1;
  const start = Math.floor(s.decayStart * s.steps);
  if (s.decay === "none" || step < start || s.steps <= start) return s.peak * warm;
  const progress = (step - start) / (s.steps - start);
  const decay = s.decay === "linear" ? 1 - progress : 0.5 * (1 + Math.cos(Math.PI * progress));
  return s.peak * Math.min(warm, decay);
}

/** A coefficient ramped linearly from 0 over `warmupSteps` (the L1 warm-up). */
export function rampedCoefficient(value: number, warmupSteps: number, step: number): number {
  return warmupSteps > 0 ? value * Math.min(1, (step + 1) / warmupSteps) : value;
}
