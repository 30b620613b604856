import { z } from "zod";
import { Address } from "./dtype.js";

/** One SAE of a sweep. */
export const SaeSpec = z
  .object({
    name: z.string().regex(/^[A-Za-z0-9._-]+$/).describe("Folder name of this SAE in the run."),
    recipe: z
      .enum(["topk", "batchtopk", "relu", "jumprelu"])
      .default("topk")
      .describe("topk (Llama Scope), jumprelu (topk, then converted to per-latent thresholds), batchtopk, relu (ReLU + L1)."),
    width: z.number().int().positive().default(1024).describe("Number of latents n."),
    k: z.number().int().positive().default(50).describe("Active latents per token (topk, jumprelu, batchtopk)."),
    lr: z.number().positive().default(2e-4).describe("Peak Adam learning rate."),
    l1Coefficient: z.number().min(0).default(5).describe("relu: weight of the decoder-norm-weighted L1 penalty."),
    l1WarmupSteps: z.number().int().min(0).default(0).describe("relu: steps over which the L1 weight ramps up from 0."),
    auxKCoefficient: z.number().min(0).default(1 / 32).describe("AuxK loss weight (topk, jumprelu, batchtopk); 0 turns AuxK off."),
    kAux: z.number().int().min(0).default(0).describe("Dead latents AuxK uses per token; 0 means dModel / 2."),
  })
  .strict();
export type SaeSpec = z.infer<typeof SaeSpec>;

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

/** The SAE trainer: one hook point, one or several SAEs on the same batches. */
export const TrainerSection = z
  .object({
    address: Address.default("127.0.0.1:50071").describe("Where the trainer serves its control RPCs."),
    bufferAddress: Address.default("127.0.0.1:50051").describe("The buffer to pull batches from."),
    id: z.string().min(1).default("trainer-0").describe("Trainer id reported to the buffer."),
    group: z.string().min(1).default("default").describe("Trainers of a group share rows per `share`."),
    share: z.enum(["fan_out", "split"]).default("fan_out").describe("Receive every row (fan_out) or a disjoint share (split)."),
    hookPoint: z.string().min(1).default("blocks.1.hook_resid_post").describe("Hook point to train on."),
    dModel: z.number().int().positive().default(64).describe("Activation width; must match the buffer's pool."),
    batchSize: z.number().int().positive().default(1024).describe("Rows per step."),
    steps: z.number().int().positive().default(1000).describe("Optimiser steps."),
    saes: z.array(SaeSpec).min(1).prefault([{ name: "topk-k32", recipe: "topk", width: 1024, k: 32, lr: 2e-4 }]).describe("The sweep."),
    adam: AdamSection.prefault({}).describe("Adam hyper-parameters, shared by the sweep."),
    lrWarmupSteps: z.number().int().min(0).default(100).describe("Steps of linear learning-rate warm-up from 0."),
    lrDecay: z.enum(["none", "linear", "cosine"]).default("linear").describe("Learning-rate decay to 0 from lrDecayStart to the last step."),
    lrDecayStart: z.number().min(0).max(1).default(0.8).describe("Fraction of `steps` after which the decay begins."),
    normalizeActivations: z
      .enum(["expected_average", "none"])
      .default("expected_average")
      .describe("Scale inputs so E|x| = sqrt(dModel), estimated once; folded back into the weights on export."),
    normEstimateBatches: z.number().int().positive().default(4).describe("First batches used for the normalisation and the b_dec init."),
    bDecInit: z.enum(["mean", "geometric_median", "zeros"]).default("mean").describe("b_dec initialisation from the first batches."),
    unitNormDecoder: z.boolean().default(true).describe("Rescale decoder rows to unit norm after every step."),
    deadWindowTokens: z.number().int().positive().default(10_000_000).describe("A latent that has not fired for this many tokens is dead."),
    thresholdEmaRate: z.number().gt(0).max(1).default(0.01).describe("batchtopk: rate of the running minimum-activation threshold used at inference."),
    jumprelu: JumpReluSection.prefault({}).describe("TopK to JumpReLU conversion."),
    logEvery: z.number().int().positive().default(10).describe("Steps between metric lines."),
    checkpointEvery: z.number().int().min(0).default(500).describe("Steps between checkpoints; 0 checkpoints only at the end and on request."),
    keepCheckpoints: z.number().int().min(2).default(2).describe("Checkpoints kept per SAE; at least 2, so a sweep can always resume at a step every SAE holds."),
    resume: z.boolean().default(true).describe("Continue from the newest checkpoint in the run folder when one exists."),
    exportOnFinish: z.boolean().default(true).describe("Write the SAELens export when training ends."),
    modelName: z.string().default("").describe("model_name in the exported cfg.json; empty takes the producer model's folder name."),
    threads: z.number().int().min(0).default(0).describe("onnxruntime intra-op threads; 0 lets onnxruntime choose."),
  })
  .strict()
  .superRefine((t, ctx) => {
    const names = new Set<string>();
    t.saes.forEach((sae, i) => {
      if (names.has(sae.name)) ctx.addIssue({ code: "custom", path: ["saes", i, "name"], message: `duplicate SAE name "${sae.name}"` });
      names.add(sae.name);
      if (sae.recipe !== "relu" && sae.k > sae.width) {
        ctx.addIssue({ code: "custom", path: ["saes", i, "k"], message: `k (${sae.k}) exceeds width (${sae.width})` });
      }
      if (sae.kAux > sae.width) {
        ctx.addIssue({ code: "custom", path: ["saes", i, "kAux"], message: `kAux (${sae.kAux}) exceeds width (${sae.width})` });
      }
    });
  });
