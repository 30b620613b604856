import { createRequire } from "node:module";

/** Timing helpers shared by the benchmarks. */
export const GB = 1e9;

/** The middle value of `xs` (the upper one of the two middles for an even count). */
export const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

/** Wall time of one call of `fn`, in ms. */
export async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/** Runs `fn` `repeats` times after one warm-up and returns the median wall time in ms. */
export async function medianMs(repeats: number, fn: () => Promise<void> | void): Promise<number> {
  await fn();
  const times: number[] = [];
  for (let i = 0; i < repeats; i++) times.push(await timed(async () => fn()));
  return median(times);
}

export const gbPerSecond = (bytes: number, ms: number): number => bytes / GB / (ms / 1000);
export const round = (x: number, digits = 3): number => Number(x.toFixed(digits));

export function line(label: string, value: number, unit: string, reference?: { label: string; value: number }): void {
  const ref = reference
    ? `   vs ${reference.label} ${reference.value.toFixed(3)} ${unit}   ratio ${(value / reference.value).toFixed(3)}`
    : "";
  process.stdout.write(`${label.padEnd(44)} ${value.toFixed(3).padStart(10)} ${unit}${ref}\n`);
}

/** The installed version of an npm package the benchmarks name in their JSON. */
export const packageVersion = (name: string): string =>
  (createRequire(import.meta.url)(`${name}/package.json`) as { version: string }).version;
