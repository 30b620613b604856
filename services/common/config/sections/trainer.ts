import { z } from "zod";
import { RECIPE_NAMES, RECIPES, RECIPES_DESCRIPTION } from "../recipes.js";
import { Address } from "./dtype.js";

/** One SAE of a sweep. */
export const SaeSpec = z
  .object({
    name: z
      .string()
      .regex(/^[A-Za-z0-9._-]+$/)
      .describe("Folder name of this SAE in the run."),
    recipe: z.enum(RECIPE_NAMES).default("topk").describe(RECIPES_DESCRIPTION),
    width: z.number().int().positive().default(1024).describe("Number of latents n."),
    k: z.number().int().positive().default(50).describe("Active latents per token (topk, jumprelu, batchtopk, matryoshka)."),
    kStart: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe(
        "k at step 0, falling linearly to k over trainer.kAnnealFraction of the steps (Llama Scope's k annealing); 0 trains at k throughout.",
      ),
    prefixes: z
      .array(z.number().int().positive())
      .default([])
      .describe(
        "matryoshka: nested prefix sizes, increasing, at least k and below width; each prefix and the whole dictionary reconstruct x, losses summed.",
      ),
    lr: z.number().positive().default(2e-4).describe("Peak Adam learning rate."),
    l1Coefficient: z.number().min(0).default(5).describe("relu, gated: weight of the decoder-norm-weighted L1 penalty."),
    l1WarmupSteps: z.number().int().min(0).default(0).describe("relu, gated: steps over which the L1 weight ramps up from 0."),
    auxKCoefficient: z
      .number()
      .min(0)
      .default(1 / 32)
      .describe("AuxK loss weight (topk, jumprelu, batchtopk, matryoshka); 0 turns AuxK off."),
    kAux: z.number().int().min(0).default(0).describe("Dead latents AuxK uses per token; 0 means dModel / 2."),
    l0Coefficient: z.number().min(0).default(1).describe("jumprelu_trained: weight of the sparsity penalty (SAELens' l0_coefficient)."),
    l0WarmupSteps: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe("jumprelu_trained: steps over which the sparsity weight ramps up from 0 (SAELens' l0_warm_up_steps)."),
    jumpreluBandwidth: z
      .number()
      .positive()
      .default(0.05)
      .describe(
        "jumprelu_trained: width of the rectangle kernel through which the thresholds get their straight-through gradients, in normalised units (SAELens' jumprelu_bandwidth).",
      ),
    jumpreluInitThreshold: z
      .number()
      .positive()
      .default(0.01)
      .describe(
        "jumprelu_trained: every latent's threshold at step 0, in normalised units (SAELens' jumprelu_init_threshold); positive, since a threshold at or below 0 gets no gradient.",
      ),
    jumpreluSparsityLossMode: z
      .enum(["step", "tanh"])
      .default("step")
      .describe(
        "jumprelu_trained: the sparsity penalty: step counts active latents (L0, Google DeepMind's), tanh sums tanh(jumpreluTanhScale * f_i * |W_dec_i|) (Anthropic's); SAELens' jumprelu_sparsity_loss_mode.",
      ),
    jumpreluTanhScale: z
      .number()
      .positive()
      .default(4)
      .describe("jumprelu_trained, tanh mode: the scale inside the tanh (SAELens' jumprelu_tanh_scale)."),
    preActLossCoefficient: z
      .number()
      .min(0)
      .default(0)
      .describe(
        "jumprelu_trained: weight of the pre-activation loss on dead latents, mean over tokens of sum_i relu(threshold_i - pre_i) |W_dec_i| (Anthropic's; SAELens' pre_act_loss_coefficient, 3e-6 there); 0 turns it off.",
      ),
  })
  .strict();
export type SaeSpec = z.infer<typeof SaeSpec>;

/** The keys only jumprelu_trained reads, and their defaults: set on another recipe, they would be silently ignored. */
const JUMPRELU_TRAINED_KEYS = [
  "l0Coefficient",
  "l0WarmupSteps",
  "jumpreluBandwidth",
  "jumpreluInitThreshold",
  "jumpreluSparsityLossMode",
  "jumpreluTanhScale",
  "preActLossCoefficient",
] as const;
const SAE_DEFAULTS = SaeSpec.parse({ name: "defaults" });

export const AdamSection = z
  .object({
    beta1: z.number().min(0).lt(1).default(0.9).describe("First-moment decay."),
    beta2: z.number().min(0).lt(1).default(0.999).describe("Second-moment decay."),
    eps: z.number().positive().default(1e-8).describe("Added to the root of the second moment."),
  })
  .strict();

export const JumpReluSection = z
  .object({
    calibrationTokens: z
      .number()
      .int()
      .positive()
      .default(32768)
      .describe("Recent tokens kept to set JumpReLU thresholds at export (Llama Scope used one batch of 32768)."),
  })
  .strict();

/** The SAE trainer: one or several hook points, the same sweep of SAEs on each. */
export const TrainerSection = z
  .object({
    address: Address.default("127.0.0.1:50071").describe("Where the trainer serves its control RPCs."),
    id: z.string().min(1).default("trainer-0").describe("Trainer id reported to the buffer."),
    group: z.string().min(1).default("default").describe("Trainers of a group share rows per `share`."),
    share: z.enum(["fan_out", "split"]).default("fan_out").describe("Receive every row (fan_out) or a disjoint share (split)."),
    hookPoints: z
      .array(z.string().min(1))
      .min(1)
      .default(["blocks.1.hook_resid_post"])
      .refine((h) => new Set(h).size === h.length, "hook points must be unique")
      .describe(
        "Hook points of the run's trainers; the sweep `saes` is trained on each. Trainer process shardIndex of shardCount takes the ones at positions p with p % shardCount == shardIndex (with more trainers than hook points, hook point shardIndex % count). A hook point's width is its pool's dModel.",
      ),
    shardIndex: z.number().int().min(0).default(0).describe("This trainer process's place among the run's trainers."),
    shardCount: z.number().int().positive().default(1).describe("Trainer processes sharing trainer.hookPoints."),
    batchSize: z.number().int().positive().default(1024).describe("Rows per step."),
    steps: z.number().int().positive().default(1000).describe("Optimiser steps."),
    saes: z
      .array(SaeSpec)
      .min(1)
      .prefault([{ name: "topk-k32", recipe: "topk", width: 1024, k: 32, lr: 2e-4 }])
      .describe("The sweep."),
    adam: AdamSection.prefault({}).describe("Adam hyper-parameters, shared by the sweep."),
    lrWarmupSteps: z.number().int().min(0).default(100).describe("Steps of linear learning-rate warm-up from 0."),
    lrDecay: z
      .enum(["none", "linear", "cosine"])
      .default("linear")
      .describe("Learning-rate decay toward lrEndRatio x peak from lrDecayStart to the last step."),
    lrDecayStart: z.number().min(0).max(1).default(0.8).describe("Fraction of `steps` after which the decay begins."),
    lrEndRatio: z
      .number()
      .min(0)
      .lt(1)
      .default(0)
      .describe("Where the decay ends, as a fraction of the peak learning rate (Llama Scope: 0.01)."),
    kAnnealFraction: z.number().gt(0).max(1).default(0.1).describe("Fraction of `steps` over which k falls from saes[].kStart to k."),
    gradClipNorm: z
      .number()
      .min(0)
      .default(0)
      .describe("Scale each SAE's gradients so their global norm is at most this before Adam; 0 does not clip."),
    decoderInitNorm: z
      .number()
      .positive()
      .default(1)
      .describe("Norm of each decoder row at initialisation (Llama Scope: 0.5); the encoder starts as the decoder's transpose."),
    normalizeActivations: z
      .enum(["expected_average", "none"])
      .default("expected_average")
      .describe("Scale inputs so E|x| = sqrt(dModel), estimated once; folded back into the weights on export."),
    normEstimateBatches: z.number().int().positive().default(4).describe("First batches used for the normalisation and the b_dec init."),
    bDecInit: z.enum(["mean", "geometric_median", "zeros"]).default("mean").describe("b_dec initialisation from the first batches."),
    unitNormDecoder: z
      .boolean()
      .default(true)
      .describe(
        "Rescale decoder rows to unit norm after every step; off, norms train freely and TopK ranks latents by activation x decoder norm (Llama Scope).",
      ),
    deadWindowTokens: z.number().int().positive().default(10_000_000).describe("A latent that has not fired for this many tokens is dead."),
    thresholdEmaRate: z
      .number()
      .gt(0)
      .max(1)
      .default(0.01)
      .describe("batchtopk, matryoshka: rate of the running minimum-activation threshold used at inference."),
    sparsityWindowTokens: z
      .number()
      .int()
      .positive()
      .default(8_192_000)
      .describe("Tokens over which sparsity.safetensors counts firings (SAELens' default window: 2000 steps of 4096 tokens)."),
    jumprelu: JumpReluSection.prefault({}).describe("TopK to JumpReLU conversion."),
    logEvery: z.number().int().positive().default(10).describe("Steps between metric lines."),
    checkpointEvery: z
      .number()
      .int()
      .min(0)
      .default(500)
      .describe("Steps between checkpoints; 0 checkpoints only at the end and on request."),
    keepCheckpoints: z
      .number()
      .int()
      .min(2)
      .default(2)
      .describe("Checkpoints kept per SAE; at least 2, so a sweep can always resume at a step every SAE holds."),
    resume: z.boolean().default(true).describe("Continue from the newest checkpoint in the run folder when one exists."),
    exportOnFinish: z.boolean().default(true).describe("Write the SAELens export when training ends."),
    modelName: z.string().default("").describe("model_name in the exported cfg.json; empty takes the producer model's folder name."),
    threads: z.number().int().min(0).default(0).describe("onnxruntime intra-op threads; 0 lets onnxruntime choose."),
    executionProvider: z
      .enum(["cpu", "cuda", "webgpu"])
      .default("cpu")
      .describe(
        "onnxruntime execution provider of the training step. webgpu keeps the SAE state on the GPU between steps; cuda runs the step on the GPU but moves the state across the bus each step (onnxruntime-node binds device outputs for WebGPU only).",
      ),
    deviceId: z
      .number()
      .int()
      .min(0)
      .default(0)
      .describe("CUDA device ordinal; WebGPU takes the adapter Dawn prefers (a pod sees only its own GPU)."),
  })
  .strict()
  .superRefine((t, ctx) => {
    if (t.shardIndex >= t.shardCount)
      ctx.addIssue({ code: "custom", path: ["shardIndex"], message: `must be below shardCount (${t.shardCount})` });
    const names = new Set<string>();
    t.saes.forEach((sae, i) => {
      if (names.has(sae.name)) ctx.addIssue({ code: "custom", path: ["saes", i, "name"], message: `duplicate SAE name "${sae.name}"` });
      names.add(sae.name);
      const issue = (key: string, message: string) => ctx.addIssue({ code: "custom", path: ["saes", i, key], message });
      const { ranked, nested, thresholded } = RECIPES[sae.recipe];
      if (!thresholded) {
        for (const key of JUMPRELU_TRAINED_KEYS) {
          if (sae[key] !== SAE_DEFAULTS[key]) issue(key, `only jumprelu_trained trains with ${key}, not ${sae.recipe}`);
        }
      }
      if (ranked && sae.k > sae.width) issue("k", `k (${sae.k}) exceeds width (${sae.width})`);
      if (sae.kAux > sae.width) issue("kAux", `kAux (${sae.kAux}) exceeds width (${sae.width})`);
      if (sae.kStart > 0 && !ranked) issue("kStart", `${sae.recipe} keeps no top k to anneal; leave kStart at 0`);
      else if (sae.kStart > 0 && (sae.kStart < sae.k || sae.kStart > sae.width))
        issue("kStart", `kStart (${sae.kStart}) must lie between k (${sae.k}) and width (${sae.width})`);
      if (nested) {
        if (sae.prefixes.length === 0) issue("prefixes", `${sae.recipe} needs at least one prefix below width`);
        sae.prefixes.forEach((p, j) => {
          if (p < sae.k || p >= sae.width) issue("prefixes", `prefix ${p} must be at least k (${sae.k}) and below width (${sae.width})`);
          if (j > 0 && p <= sae.prefixes[j - 1]!) issue("prefixes", `prefixes must increase (${sae.prefixes[j - 1]} then ${p})`);
        });
      } else if (sae.prefixes.length > 0) {
        const nesting = RECIPE_NAMES.filter((r) => RECIPES[r].nested).join(", ");
        issue("prefixes", `only ${nesting} nests prefixes, not ${sae.recipe}`);
      }
    });
    if (t.unitNormDecoder && t.decoderInitNorm !== 1) {
      ctx.addIssue({
        code: "custom",
        path: ["decoderInitNorm"],
        message: `${t.decoderInitNorm} would be renormalised to 1 after the first step; set unitNormDecoder=false to train free norms`,
      });
    }
  });
