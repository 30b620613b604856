import { z } from "zod";

/** Wire dtype names as they appear in configs; the codec maps them to saeflow.v1.DType. */
export const DTypeName = z.enum(["fp32", "fp16", "bf16"]);
export type DTypeName = z.infer<typeof DTypeName>;

/** A host:port a gRPC server binds to or a client dials. */
export const Address = z.string().regex(/^[^\s:]+:\d{1,5}$/, "expected host:port");
