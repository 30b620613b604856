import type { StepSpec } from "../../services/trainer/graph/step.js";

/** The step graphs placement-child.ts opens on WebGPU: every recipe, schedule and input type. */
export const CASES: Record<string, Partial<StepSpec>> = {
  "topk + AuxK": { auxK: true },
  "topk ranked by decoder norm, clipped": { auxK: true, unitNormDecoder: false, gradClipNorm: 1 },
  "topk while k anneals": { auxK: true, annealK: true, k: 6 },
  "batchtopk + AuxK": { recipe: "batchtopk", auxK: true },
  "batchtopk while k anneals": { recipe: "batchtopk", annealK: true, k: 7 },
  "matryoshka + AuxK, bf16 word pairs": { recipe: "matryoshka", prefixes: [4, 10], auxK: true, input: "bf16-words" },
  "matryoshka while k anneals, fp16 word pairs": { recipe: "matryoshka", prefixes: [5, 9], annealK: true, k: 8, input: "fp16-words" },
  relu: { recipe: "relu", unitNormDecoder: false },
  gated: { recipe: "gated" },
  "jumprelu_trained, L0 + pre-act loss": {
    recipe: "jumprelu_trained",
    jumpRelu: { bandwidth: 0.05, sparsityLoss: "step", tanhScale: 4, preActLoss: true },
  },
  "jumprelu_trained, tanh, free decoder norms": {
    recipe: "jumprelu_trained",
    unitNormDecoder: false,
    jumpRelu: { bandwidth: 0.05, sparsityLoss: "tanh", tanhScale: 4, preActLoss: false },
  },
};
