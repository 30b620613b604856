import { z } from "zod";
import { Address, DTypeName } from "./dtype.js";

/** The activation producer: tokenizer, ONNX LM, hook points, dataset. */
export const ProducerSection = z
  .object({
    id: z
      .string()
      .regex(/^[A-Za-z0-9._-]*$/)
      .default("")
      .describe("Producer id (NATS member name, chunk producer_id); empty means producer-<shardIndex>."),
    address: Address.default("127.0.0.1:50061").describe("Where the producer serves its control RPCs."),
    model: z.string().min(1).default(".cache/tiny-llama/model.onnx").describe("ONNX causal LM (optimum export layout)."),
    tokenizer: z
      .string()
      .min(1)
      .default("builtin:llama3_1")
      .describe("tokenizer.json path (or its folder, with tokenizer_config.json beside it), or builtin:llama3_1."),
    dataset: z
      .array(z.string().min(1))
      .min(1)
      .default(["builtin:corpus"])
      .describe("Text/JSONL files or folders, or builtin:corpus (English .md docs of the installed npm dependencies)."),
    textField: z.string().min(1).default("text").describe("Field holding the text in JSONL records."),
    tokensField: z
      .string()
      .default("")
      .describe(
        "Field holding a document's token ids in JSONL records (written by saeflow pretokenize with this tokenizer), read instead of text; empty means JSONL records hold text.",
      ),
    textSplit: z
      .enum(["line", "paragraph", "file"])
      .default("paragraph")
      .describe("What one document of a plain-text file is: a line, a blank-line-separated paragraph, or the whole file."),
    epochs: z.number().int().min(0).default(0).describe("Passes over this producer's shard; 0 repeats until stopped."),
    hookPoints: z.array(z.string().min(1)).min(1).default(["blocks.1.hook_resid_post"]).describe("Hook points fed by each forward pass."),
    contextLength: z.number().int().min(2).default(128).describe("Tokens per packed context."),
    batchContexts: z.number().int().positive().default(8).describe("Contexts per forward pass; one chunk per hook point holds its rows."),
    prependBos: z.boolean().default(true).describe("Start each context with BOS (documents inside a context are always separated by BOS)."),
    excludeBos: z.boolean().default(true).describe("Drop BOS positions from what is sent."),
    dtype: DTypeName.default("fp32").describe("Dtype sent; must equal the buffer's."),
    executionProvider: z.enum(["cpu", "cuda", "webgpu"]).default("cpu").describe("onnxruntime execution provider."),
    threads: z.number().int().min(0).default(0).describe("Intra-op threads; 0 lets onnxruntime choose."),
    maxInFlightChunks: z
      .number()
      .int()
      .positive()
      .default(8)
      .describe("Chunks sent but not yet acknowledged, kept for resend; production waits at this many."),
    shardIndex: z.number().int().min(0).default(0).describe("This producer's shard of the documents."),
    shardCount: z.number().int().positive().default(1).describe("Number of producers sharing the dataset."),
    stateFile: z.string().default("").describe("Where the dataset position is saved; empty means <run.dir>/<producer id>.position.json."),
    resume: z.boolean().default(true).describe("Continue from the saved position when stateFile exists; false starts the shard afresh."),
  })
  .strict()
  .superRefine((p, ctx) => {
    if (p.shardIndex >= p.shardCount) {
      ctx.addIssue({ code: "custom", path: ["shardIndex"], message: `must be below shardCount (${p.shardCount})` });
    }
    const seen = new Set<string>();
    p.hookPoints.forEach((h, i) => {
      if (seen.has(h)) ctx.addIssue({ code: "custom", path: ["hookPoints", i], message: `${h} is listed twice` });
      seen.add(h);
    });
  });
