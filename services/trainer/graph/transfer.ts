import { F32, GraphBuilder } from "./builder.js";
import { type StateName, stateOf, stateShape, type StepRecipe } from "./step.js";

/** The copy graph's output for state tensor `name`. */
export const copyName = (name: StateName) => `copy_${name}` as const;

/**
 * One Identity per state tensor of `recipe`: what moves a whole SAE state between the host and a
 * device in one run. Opened with device outputs it uploads; opened with host outputs it reads the
 * state back, which works on every provider (reading a device tensor's data directly aborts the
 * process on some WebGPU drivers).
 */
export function buildCopyGraph(recipe: StepRecipe, n: number, d: number): Uint8Array {
  const g = new GraphBuilder(`sae_state_copy_${recipe}`);
  for (const name of stateOf(recipe)) {
    const dims = stateShape(name, n, d);
    g.output(g.op("Identity", [g.input(name, F32, dims)], {}, copyName(name)), copyName(name), F32, dims);
  }
  return g.build();
}
