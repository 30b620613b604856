/**
 * The arithmetic of a cluster run, kept apart from how it is read and printed so each number can be
 * traced: a run is every hook point's pool (on some buffer shard), the SAEs trained on each hook
 * point, and the tokens each SAE sees; rates say how fast one GPU produces or trains and how fast a
 * buffer shard and a network link move bytes. One forward pass feeds every hook point, and a hook
 * point's rows go once to each trainer process that trains SAEs on it (a sweep packed in one process
 * shares one stream).
 */

export interface PlannedHook {
  name: string;
  dModel: number;
  /** Index of the buffer shard that owns the pool. */
  shard: number;
  /** Latent counts of the SAEs trained on this hook point. */
  widths: number[];
  /** Trainer processes reading this hook point (each gets every row: a sweep split over processes). */
  streams: number;
}

export interface Layout {
  hooks: PlannedHook[];
  shards: number;
  /** Rows per pool. */
  poolRows: number;
  /** Bytes per activation element on the wire and in the pools. */
  dtypeBytes: number;
  /** Tokens every SAE trains on (steps x batch size). */
  tokensPerSae: number;
}

export interface Rates {
  /** Tokens per second one producer GPU turns into activations at every hook point (the model cut after its deepest hook). */
  producerTokensPerSecond: number;
  /** Tokens per second one trainer GPU trains one SAE of the given width on; widths between the given ones interpolate in 1/rate. */
  trainerTokensPerSecond: Record<number, number>;
  /** Bytes per second one buffer shard takes in and serves out, together (push + serve). */
  bufferBytesPerSecond: number;
  /** Bytes per second one node's network link carries each way. */
  linkBytesPerSecond: number;
  gpusPerNode: number;
  /** Memory one buffer node offers its pools, bytes. */
  bufferNodeBytes: number;
  /** Where each rate came from, printed beside it. */
  sources: Record<string, string>;
}

export interface ShardPlan {
  shard: number;
  hooks: number;
  poolBytes: number;
  inBytesPerSecond: number;
  outBytesPerSecond: number;
}

export interface Plan {
  producerGpus: number;
  trainerGpus: number;
  nodes: number;
  /** GPU-seconds each stage needs for the whole run. */
  producerGpuSeconds: number;
  trainerGpuSeconds: number;
  /** Seconds each stage alone would take with its GPUs, shards and links. */
  seconds: { producers: number; trainers: number; buffers: number; links: number };
  /** The run's time: the slowest stage. */
  runSeconds: number;
  bottleneck: keyof Plan["seconds"];
  shardPlans: ShardPlan[];
  /** Busiest producer node's and trainer node's link, bytes per second at the run's pace. */
  producerLinkBytesPerSecond: number;
  trainerLinkBytesPerSecond: number;
  /** Activation bytes the run moves into the buffers and out of them. */
  bytesIn: number;
  bytesOut: number;
}

/** Tokens per second of one GPU training one SAE of `width` latents: the nearest measured widths, linear in seconds per token. */
export function trainerRate(rates: Rates, width: number): number {
  const known = Object.entries(rates.trainerTokensPerSecond)
    .map(([w, r]) => [Number(w), r] as const)
    .sort((a, b) => a[0] - b[0]);
  if (known.length === 0) throw new Error("no trainer rate given");
  const exact = known.find(([w]) => w === width);
  if (exact) return exact[1];
  const below = known.filter(([w]) => w < width).at(-1) ?? known[0]!;
  const above = known.find(([w]) => w > width) ?? known.at(-1)!;
  if (below[0] === above[0]) return below[1] * (below[0] / width); // one measured width: time grows with width
  const t = (width - below[0]) / (above[0] - below[0]);
  return 1 / (1 / below[1] + t * (1 / above[1] - 1 / below[1]));
}

/**
 * Lays `gpus` GPUs out between producers and trainers in proportion to their work, so neither waits
 * for the other, and times every stage. With fewer GPUs than needed for one of each, one of each.
 */
export function plan(layout: Layout, rates: Rates, gpus: number): Plan {
  const T = layout.tokensPerSae;
  const producerGpuSeconds = T / rates.producerTokensPerSecond;
  const trainerGpuSeconds = layout.hooks.reduce((sum, h) => sum + h.widths.reduce((s, w) => s + T / trainerRate(rates, w), 0), 0);
  const share = producerGpuSeconds / (producerGpuSeconds + trainerGpuSeconds);
  const producerGpus = Math.max(1, Math.min(gpus - 1, Math.round(gpus * share)));
  const trainerGpus = Math.max(1, gpus - producerGpus);

  const rowBytes = (h: PlannedHook) => h.dModel * layout.dtypeBytes;
  const bytesIn = layout.hooks.reduce((s, h) => s + T * rowBytes(h), 0);
  const bytesOut = layout.hooks.reduce((s, h) => s + T * rowBytes(h) * h.streams, 0);
  const perShard = Array.from({ length: layout.shards }, (_, shard) => layout.hooks.filter((h) => h.shard === shard));
  const shardBytes = perShard.map((hooks) => hooks.reduce((s, h) => s + T * rowBytes(h) * (1 + h.streams), 0));
  const shardSeconds = Math.max(...shardBytes.map((b) => b / rates.bufferBytesPerSecond));

  const producerNodes = Math.ceil(producerGpus / rates.gpusPerNode);
  const trainerNodes = Math.ceil(trainerGpus / rates.gpusPerNode);
  // Links: producer nodes send every hook point's rows, trainer nodes receive their streams, each
  // buffer shard's node receives and sends its own; the busiest link bounds the run.
  const linkSeconds = Math.max(
    bytesIn / producerNodes / rates.linkBytesPerSecond,
    bytesOut / trainerNodes / rates.linkBytesPerSecond,
    ...perShard.map((hooks) => {
      const inBytes = hooks.reduce((s, h) => s + T * rowBytes(h), 0);
      const outBytes = hooks.reduce((s, h) => s + T * rowBytes(h) * h.streams, 0);
      return Math.max(inBytes, outBytes) / rates.linkBytesPerSecond;
    }),
  );
  const seconds = {
    producers: producerGpuSeconds / producerGpus,
    trainers: trainerGpuSeconds / trainerGpus,
    buffers: shardSeconds,
    links: linkSeconds,
  };
  const bottleneck = (Object.keys(seconds) as Array<keyof typeof seconds>).reduce((a, b) => (seconds[a] >= seconds[b] ? a : b));
  const runSeconds = seconds[bottleneck];
  const shardPlans = perShard.map((hooks, shard) => ({
    shard,
    hooks: hooks.length,
    poolBytes: hooks.reduce((s, h) => s + layout.poolRows * rowBytes(h), 0),
    inBytesPerSecond: hooks.reduce((s, h) => s + T * rowBytes(h), 0) / runSeconds,
    outBytesPerSecond: hooks.reduce((s, h) => s + T * rowBytes(h) * h.streams, 0) / runSeconds,
  }));
  return {
    producerGpus,
    trainerGpus,
    nodes: producerNodes + trainerNodes,
    producerGpuSeconds,
    trainerGpuSeconds,
    seconds,
    runSeconds,
    bottleneck,
    shardPlans,
    producerLinkBytesPerSecond: bytesIn / producerNodes / runSeconds,
    trainerLinkBytesPerSecond: bytesOut / trainerNodes / runSeconds,
    bytesIn,
    bytesOut,
  };
}
