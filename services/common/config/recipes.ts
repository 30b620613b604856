/**
 * The one table of SAE recipes: what each config recipe trains as, how it exports, and which
 * terms and checks apply to it. The config schema, the trainer's step graphs, its reference step,
 * the training loop and `saeflow export` all read their recipe rules from here.
 */

/** The step graphs the trainer builds; `jumprelu` trains as TopK and is converted at export, `jumprelu_trained` has its own. */
export type StepRecipe = "topk" | "batchtopk" | "matryoshka" | "relu" | "gated" | "jumprelu_trained";

/** Trained tensors of every recipe, in state order. */
export const CORE_PARAMS = ["W_enc", "b_enc", "W_dec", "b_dec"] as const;
/** Gated's magnitude path, after the core tensors. */
export const GATED_PARAMS = ["r_mag", "b_mag"] as const;
/** A trained JumpReLU's per-latent threshold, after the core tensors. */
export const JUMPRELU_PARAMS = ["threshold"] as const;
export type CoreParam = (typeof CORE_PARAMS)[number];
export type GatedParam = (typeof GATED_PARAMS)[number];
export type JumpReluParam = (typeof JUMPRELU_PARAMS)[number];
export type ParamName = CoreParam | GatedParam | JumpReluParam;

export interface StepRules {
  /**
   * What the code keeps of the pre-activations: each token's top k, the batch's top B*k, every
   * positive one, or every one above its latent's learned threshold.
   */
  keeps: "token-top-k" | "batch-top-k" | "positive" | "above-threshold";
  /** Keeps a top k: k and kStart apply, and AuxK can revive dead latents. */
  ranked: boolean;
  /** A decoder-norm-weighted L1 penalty on the codes, weighted by l1Coefficient. */
  penalised: boolean;
  /** Reports the smallest score it kept, tracked as the running threshold its export infers with. */
  batchThreshold: boolean;
  /** Separate gate and magnitude paths sharing the encoder product (Gated). */
  magnitudePath: boolean;
  /**
   * A learned per-latent threshold trained through straight-through estimators, with an L0 (or
   * tanh) penalty weighted by l0Coefficient and an optional pre-activation loss on dead latents (JumpReLU).
   */
  thresholded: boolean;
  /** Trained tensors, in state order. */
  params: readonly ParamName[];
}

const rank = (keeps: StepRules["keeps"]): Pick<StepRules, "keeps" | "ranked" | "batchThreshold"> => ({
  keeps,
  ranked: keeps === "token-top-k" || keeps === "batch-top-k",
  batchThreshold: keeps === "batch-top-k",
});

const plain = { penalised: false, magnitudePath: false, thresholded: false, params: CORE_PARAMS } as const;

/** Per step recipe: the code it keeps and the terms its step has. */
export const STEP_RECIPES: Readonly<Record<StepRecipe, StepRules>> = {
  topk: { ...rank("token-top-k"), ...plain },
  batchtopk: { ...rank("batch-top-k"), ...plain },
  matryoshka: { ...rank("batch-top-k"), ...plain },
  relu: { ...rank("positive"), ...plain, penalised: true },
  gated: { ...rank("positive"), ...plain, penalised: true, magnitudePath: true, params: [...CORE_PARAMS, ...GATED_PARAMS] },
  jumprelu_trained: { ...rank("above-threshold"), ...plain, thresholded: true, params: [...CORE_PARAMS, ...JUMPRELU_PARAMS] },
};

/** The `architecture` of a SAELens export. */
export type SaeLensArchitecture = "standard" | "topk" | "jumprelu" | "gated";

export interface RecipeRules extends StepRules {
  /** The step graph it trains with. */
  step: StepRecipe;
  /** The SAELens architecture it exports as. */
  exportsAs: SaeLensArchitecture;
  /** Its export needs thresholds calibrated on recent batches (Llama Scope's TopK to JumpReLU). */
  calibrates: boolean;
  /** Nested prefixes of the dictionary each reconstruct x (Matryoshka); `prefixes` applies. */
  nested: boolean;
  /** What the schema says of it beside its name; empty says nothing. */
  description: string;
}

/** A config recipe: its step recipe's rules, and what `rules` adds. */
const recipe = (step: StepRecipe, rules: Pick<RecipeRules, "exportsAs" | "description"> & Partial<RecipeRules>): RecipeRules => ({
  step,
  ...STEP_RECIPES[step],
  calibrates: false,
  nested: false,
  ...rules,
});

/**
 * Per config recipe (`trainer.saes[].recipe`), in the order the schema lists them. BatchTopK and
 * Matryoshka export their running threshold as a JumpReLU; `jumprelu` trains as TopK and calibrates
 * per-latent thresholds at export; `jumprelu_trained` learns its thresholds and exports them.
 */
export const RECIPES = {
  topk: recipe("topk", { exportsAs: "topk", description: "Llama Scope" }),
  jumprelu: recipe("topk", { exportsAs: "jumprelu", calibrates: true, description: "topk, then converted to per-latent thresholds" }),
  batchtopk: recipe("batchtopk", { exportsAs: "jumprelu", description: "" }),
  matryoshka: recipe("matryoshka", { exportsAs: "jumprelu", nested: true, description: "Matryoshka-BatchTopK" }),
  relu: recipe("relu", { exportsAs: "standard", description: "ReLU + L1" }),
  gated: recipe("gated", { exportsAs: "gated", description: "Gated SAE" }),
  jumprelu_trained: recipe("jumprelu_trained", {
    exportsAs: "jumprelu",
    description: "JumpReLU with learned thresholds and an L0 penalty, trained directly as SAELens does",
  }),
} satisfies Record<string, RecipeRules>;

export type Recipe = keyof typeof RECIPES;

/** The recipe names, for the schema's enum. */
export const RECIPE_NAMES = Object.keys(RECIPES) as [Recipe, ...Recipe[]];

/** The schema's description of the recipe field: every name, with what it is where that needs saying. */
export const RECIPES_DESCRIPTION = `${RECIPE_NAMES.map((name) => {
  const { description } = RECIPES[name];
  return description ? `${name} (${description})` : name;
}).join(", ")}.`;
