/**
 * Seeded randomness for the pool's index shuffle. xoshiro128** runs on 32-bit integer ops, which V8
 * keeps unboxed, so a draw costs a few nanoseconds on the per-row path.
 */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(seed: number) {
    // splitmix32 spreads a small seed over the 128-bit state; an all-zero state would stay zero.
    let s = seed >>> 0;
    const next = (): number => {
      s = (s + 0x9e3779b9) >>> 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = next();
    this.b = next();
    this.c = next();
    this.d = next() | 1;
  }

  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.b, 5), 7), 9) >>> 0;
    const t = this.b << 9;
    this.c ^= this.a;
    this.d ^= this.b;
    this.b ^= this.c;
    this.a ^= this.d;
    this.c ^= t;
    this.d = rotl(this.d, 11);
    return result;
  }

  /** A uniform integer in [0, n) for n up to 2^32, from 53 random bits so the bias is below 2^-21. */
  below(n: number): number {
    const hi = this.nextU32();
    const lo = this.nextU32() >>> 11;
    return Math.floor(((hi * 2097152 + lo) / 9007199254740992) * n);
  }
}

const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k));

/** A per-stream seed from the run seed and a name (FNV-1a), so hook points shuffle independently. */
export function seedFor(base: number, name: string): number {
  let h = (0x811c9dc5 ^ base) >>> 0;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}
