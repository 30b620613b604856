/**
 * Seeded normal samples: mulberry32 for uniforms, Box-Muller for normals. Small and fixed, so a
 * seed gives the same tiny model on every machine and Node version.
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export type Normal = (n: number, std: number, mean?: number) => Float32Array;

export function normalSampler(seed: number): Normal {
  const uniform = mulberry32(seed);
  return (n, std, mean = 0) => {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i += 2) {
      // 1 - u keeps the log's argument in (0, 1].
      const r = Math.sqrt(-2 * Math.log(1 - uniform()));
      const theta = 2 * Math.PI * uniform();
      out[i] = mean + std * r * Math.cos(theta);
      if (i + 1 < n) out[i + 1] = mean + std * r * Math.sin(theta);
    }
    return out;
  };
}
