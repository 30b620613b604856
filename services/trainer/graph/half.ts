import { fp16ToFp32 } from "../../common/tensor-codec.js";
import { type GraphBuilder, I32 } from "./builder.js";

/** The 16-bit formats a batch may arrive in. */
export type HalfFormat = "fp16" | "bf16";

/** Every value of `format` by its 16-bit word (bf16 word w is the float32 whose bits are w << 16). */
function valuesOf(format: HalfFormat): number[] {
  if (format === "fp16") return Array.from({ length: 65536 }, (_, w) => fp16ToFp32(w));
  return Array.from(new Float32Array(Uint32Array.from({ length: 65536 }, (_, w) => w << 16).buffer));
}

/**
 * 16-bit rows widened to float32 on the device they are fed to, as raw words read two at a time,
 * `words` [B, d/2] uint32: half the bytes of float32 cross the bus. onnxruntime-node has no bf16
 * tensor, and a WebGPU device without shader-f16 cannot run a float16 Cast, so each word is split
 * off its pair by integer division (WebGPU has no bitwise or Mod kernels) and looked up in the
 * 65536-entry table of the format's values: exact, NaN and infinities included. Little-endian: the
 * low half of a pair is the even column.
 */
export function decodeHalfWords(g: GraphBuilder, words: string, B: number, d: number, format: HalfFormat): string {
  const radix = g.constU32([65536], []);
  const high = g.op("Div", [words, radix], {}, "words_high"); // [B, d/2] odd columns
  const low = g.sub(words, g.mul(high, radix), "words_low"); // [B, d/2] even columns
  const table = g.constF(valuesOf(format), [65536], `${format}_values`);
  const value = (w: string) => g.unsqueeze(g.gather(table, g.cast(w, I32), 0), [2]); // [B, d/2, 1]
  return g.reshape(g.op("Concat", [value(low), value(high)], { axis: 2 }), [B, d], "x_f32"); // [B, d] float32
}
