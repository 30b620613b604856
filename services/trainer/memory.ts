import { STEP_RECIPES } from "../common/config/recipes.js";
import { paramsOf, stateShape, type StepRecipe, type StepSpec } from "./graph/step.js";

const F32_BYTES = 4;

/** Bytes of one SAE's state: its parameters and both Adam moments, float32. */
export function stateBytes(recipe: StepRecipe, n: number, d: number): number {
  const params = paramsOf(recipe).reduce((sum, p) => sum + stateShape(p, n, d).reduce((a, b) => a * b, 1), 0);
  return 3 * params * F32_BYTES;
}

/** The largest single tensor a step of `spec` makes, and what it is: no device buffer may be smaller. */
export function largestTensor(spec: Pick<StepSpec, "recipe" | "batchSize" | "dModel" | "width" | "k" | "annealK" | "prefixes">): {
  bytes: number;
  what: string;
} {
  const { batchSize: B, dModel: d, width: n, k } = spec;
  const { ranked } = STEP_RECIPES[spec.recipe];
  const candidates: Array<[number, string]> = [
    [B * n, `the pre-activations [${B}, ${n}]`],
    [n * d, `W_enc and W_dec [${n}, ${d}]`],
  ];
  if (ranked && !spec.annealK) candidates.push([B * k * d, `the gathered decoder rows [${B}, ${k}, ${d}]`]);
  if (spec.prefixes.length > 0)
    candidates.push([(spec.prefixes.length + 1) * B * d, `the nested reconstructions [${spec.prefixes.length + 1}, ${B}, ${d}]`]);
  const [elements, what] = candidates.reduce((a, b) => (b[0] > a[0] ? b : a));
  return { bytes: elements * F32_BYTES, what };
}

/**
 * What a step of `spec` holds on its device beyond the state it reads: the state it writes, the
 * gradients and their zeroed scatter targets ([n, d] each), the [B, n] intermediates (a few for the
 * sparse codes, more for the dense ones) and the sparse codes' gathered rows and row updates
 * ([B*k, d] each). An estimate, for the start-up line and the check.
 */
export function stepBytes(spec: Pick<StepSpec, "recipe" | "batchSize" | "dModel" | "width" | "k" | "annealK">): number {
  const { batchSize: B, dModel: d, width: n, k } = spec;
  const sparse = STEP_RECIPES[spec.recipe].ranked && !spec.annealK;
  const rows = sparse ? 3 * B * k * d : 0;
  return stateBytes(spec.recipe, n, d) + (4 * n * d + (sparse ? 3 : 8) * B * n + rows) * F32_BYTES;
}

export function formatBytes(bytes: number): string {
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${(bytes / 2 ** 10).toFixed(1)} KiB`;
}
