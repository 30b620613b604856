/** Learning-rate, k and coefficient schedules, as functions of the 0-based step being taken. */

export interface LrSchedule {
  peak: number;
  steps: number;
  warmupSteps: number;
  decay: "none" | "linear" | "cosine";
  /** Fraction of `steps` after which the decay begins. */
  decayStart: number;
  /** Where the decay heads, as a fraction of the peak (0: to 0; Llama Scope: 0.01). */
  endRatio: number;
}

/**
 * Linear warm-up from 0, flat at the peak, then a linear or cosine decay from the peak toward
 * endRatio x peak. With S = floor(decayStart * steps) and progress p = (step - S) / (steps - S), the
 * rate at a step past S is peak * (r + (1 - r) * (1 - p)) (linear) or
 * peak * (r + (1 - r) * (1 + cos(pi p)) / 2) (cosine), so it reaches r x peak one step after the last.
 */
export function learningRate(s: LrSchedule, step: number): number {
  const warm = s.warmupSteps > 0 ? Math.min(1, (step + 1) / s.warmupSteps) : 1;
  const start = Math.floor(s.decayStart * s.steps);
  if (s.decay === "none" || step < start || s.steps <= start) return s.peak * warm;
  const progress = (step - start) / (s.steps - start);
  const decay = s.decay === "linear" ? 1 - progress : 0.5 * (1 + Math.cos(Math.PI * progress));
  return s.peak * Math.min(warm, s.endRatio + (1 - s.endRatio) * decay);
}

export interface KSchedule {
  /** Active latents per token after the annealing. */
  k: number;
  /** k at step 0. */
  kStart: number;
  /** Steps the annealing takes; 0 for none. */
  annealSteps: number;
}

/**
 * Llama Scope's k annealing: k falls linearly from kStart at step 0 to k at step annealSteps, and
 * stays there; k(step) = ceil(k + (kStart - k) * (1 - step / annealSteps)).
 */
export function activeK(s: KSchedule, step: number): number {
  if (s.kStart <= s.k || step >= s.annealSteps) return s.k;
  return Math.ceil(s.k + (s.kStart - s.k) * (1 - step / s.annealSteps));
}

/** A coefficient ramped linearly from 0 over `warmupSteps` (the L1 warm-up). */
export function rampedCoefficient(value: number, warmupSteps: number, step: number): number {
  return warmupSteps > 0 ? value * Math.min(1, (step + 1) / warmupSteps) : value;
}
