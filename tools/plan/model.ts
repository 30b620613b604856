/**
 * The arithmetic of a cluster run, kept apart from how it is read and printed so each number can be
 * traced. A run is its pools (each on one or more buffer shards), its producers (one forward pass
 * feeds every pool; producer p pushes a pool's rows to the shard at p mod the number holding it),
 * its trainer processes (each trains the sweep on its hook points, reading each from every shard
 * holding it) and the tokens each SAE sees. Rates say how fast one GPU produces or trains, how fast
 * a buffer shard and a network link move bytes. Pods are packed onto nodes in index order,
 * producersPerNode, trainersPerNode and buffersPerNode to a node. A producer and trainers may share
 * a machine: producers send and trainers receive, opposite directions of its (full-duplex) link.
 */

export interface PlannedPool {
  name: string;
  dModel: number;
  /** Shards holding the pool, in table order. */
  shards: number[];
}

export interface PlannedTrainer {
  index: number;
  hookPoints: string[];
}

export interface Layout {
  pools: PlannedPool[];
  shards: number;
  producers: number;
  trainers: PlannedTrainer[];
  /** fan_out: every trainer reading a pool gets every row; split: they share its rows. */
  share: "fan_out" | "split";
  /** Latent counts of the sweep trained on each hook point. */
  widths: number[];
  /** Rows per pool. */
  poolRows: number;
  /** Bytes per activation element on the wire and in the pools. */
  dtypeBytes: number;
  /** Tokens every SAE trains on (steps x batch size). */
  tokensPerSae: number;
  /** Layers the producer runs: up to its deepest hook point, where it cuts the model. */
  producerLayers: number;
}

export interface Rates {
  /** Tokens per second one producer GPU runs the whole model at. */
  producerTokensPerSecond: number;
  /** The model's layers: a producer cut after layer L runs (L + 1) / modelLayers of it. */
  modelLayers: number;
  /** Tokens per second one trainer GPU trains one SAE of the given width on; widths between the given ones interpolate in 1/rate. */
  trainerTokensPerSecond: Record<number, number>;
  /** Row bytes per second one buffer shard passes through, each pushed once and served once (the buffer bench's rows/s x row bytes). */
  bufferBytesPerSecond: number;
  /** Bytes per second one node's network link carries each way. */
  linkBytesPerSecond: number;
  /** Producer pods (one GPU each) sharing one node's link. */
  producersPerNode: number;
  /** Trainer pods (one GPU each) sharing one node's link. */
  trainersPerNode: number;
  /** Buffer shards (processes) one buffer node runs. */
  buffersPerNode: number;
  /** Memory one buffer node offers its pools, bytes. */
  bufferNodeBytes: number;
  /** Where each rate came from, printed beside it. */
  sources: Record<string, string>;
}

export interface ShardPlan {
  shard: number;
  pools: number;
  poolBytes: number;
  /** Bytes over the whole run. */
  inBytes: number;
  outBytes: number;
  seconds: number;
  /** Pools this shard holds that no producer pushes to it (fewer producers than shards holding them). */
  unfed: string[];
}

export interface NodeLink {
  kind: "producer" | "trainer" | "buffer";
  node: number;
  inBytes: number;
  outBytes: number;
  seconds: number;
}

export type Stage = "producers" | "trainers" | "buffers" | "links";

export interface Plan {
  saes: number;
  producerGpuSeconds: number;
  trainerGpuSeconds: number;
  /** GPU-seconds of each trainer process, in index order. */
  trainerSeconds: number[];
  shardPlans: ShardPlan[];
  links: NodeLink[];
  nodes: { producer: number; trainer: number; buffer: number };
  /** Seconds each stage alone would take with its GPUs, shards and links. */
  seconds: Record<Stage, number>;
  /** The run's time: the slowest stage. */
  runSeconds: number;
  bottleneck: Stage;
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

/** Tokens per second of one producer GPU running the model up to its deepest hook point. */
export function producerRate(layout: Layout, rates: Rates): number {
  return (rates.producerTokensPerSecond * rates.modelLayers) / Math.min(layout.producerLayers, rates.modelLayers);
}

/** Trainer processes reading each pool. */
function readersOf(layout: Layout): Map<string, number> {
  const readers = new Map<string, number>(layout.pools.map((p) => [p.name, 0]));
  for (const t of layout.trainers) for (const h of t.hookPoints) readers.set(h, (readers.get(h) ?? 0) + 1);
  return readers;
}

/** Share of the producers that push `pool`'s rows to the shard at position `slot` among those holding it. */
function producerShare(layout: Layout, pool: PlannedPool, slot: number): number {
  let n = 0;
  for (let p = 0; p < layout.producers; p++) if (p % pool.shards.length === slot) n++;
  return n / layout.producers;
}

/** What each shard holds and moves over the run. */
export function shardTraffic(layout: Layout, rates: Rates): ShardPlan[] {
  const T = layout.tokensPerSae;
  const readers = readersOf(layout);
  const plans: ShardPlan[] = Array.from({ length: layout.shards }, (_, shard) => ({
    shard,
    pools: 0,
    poolBytes: 0,
    inBytes: 0,
    outBytes: 0,
    seconds: 0,
    unfed: [],
  }));
  for (const pool of layout.pools) {
    const rowBytes = pool.dModel * layout.dtypeBytes;
    const r = readers.get(pool.name) ?? 0;
    pool.shards.forEach((shard, slot) => {
      const s = plans[shard]!;
      const inBytes = T * rowBytes * producerShare(layout, pool, slot);
      s.pools++;
      s.poolBytes += layout.poolRows * rowBytes;
      s.inBytes += inBytes;
      // Every reader takes every row under fan_out; under split the readers share each row once.
      s.outBytes += inBytes * (layout.share === "fan_out" ? r : Math.min(r, 1));
      if (inBytes === 0) s.unfed.push(pool.name);
    });
  }
  // The bench's rate counts each row in once and out once: a shard's work is half its in + out bytes at that rate.
  for (const s of plans) s.seconds = (s.inBytes + s.outBytes) / (2 * rates.bufferBytesPerSecond);
  return plans;
}

/** GPU-seconds of each trainer process: its sweep on each of its hook points, over the rows it gets. */
export function trainerWork(layout: Layout, rates: Rates): number[] {
  const readers = readersOf(layout);
  const sweep = layout.widths.reduce((s, w) => s + 1 / trainerRate(rates, w), 0);
  return layout.trainers.map((t) =>
    t.hookPoints.reduce((sum, h) => {
      const tokens = layout.share === "fan_out" ? layout.tokensPerSae : layout.tokensPerSae / (readers.get(h) ?? 1);
      return sum + tokens * sweep;
    }, 0),
  );
}

/** Each node's link: producers' out, trainers' in, buffer nodes' in and out, all over the run. */
export function nodeLinks(layout: Layout, rates: Rates, shards: ShardPlan[]): NodeLink[] {
  const T = layout.tokensPerSae;
  const readers = readersOf(layout);
  const width = new Map(layout.pools.map((p) => [p.name, p.dModel * layout.dtypeBytes]));
  const perProducer = layout.pools.reduce((s, p) => s + T * p.dModel * layout.dtypeBytes, 0) / layout.producers;
  const links: NodeLink[] = [];
  const add = (kind: NodeLink["kind"], node: number, inBytes: number, outBytes: number) => {
    const last = links.find((l) => l.kind === kind && l.node === node);
    if (last) {
      last.inBytes += inBytes;
      last.outBytes += outBytes;
    } else links.push({ kind, node, inBytes, outBytes, seconds: 0 });
  };
  for (let p = 0; p < layout.producers; p++) add("producer", Math.floor(p / rates.producersPerNode), 0, perProducer);
  for (const t of layout.trainers) {
    const bytes = t.hookPoints.reduce(
      (s, h) => s + (T * (width.get(h) ?? 0)) / (layout.share === "fan_out" ? 1 : (readers.get(h) ?? 1)),
      0,
    );
    add("trainer", Math.floor(t.index / rates.trainersPerNode), bytes, 0);
  }
  for (const s of shards) add("buffer", Math.floor(s.shard / rates.buffersPerNode), s.inBytes, s.outBytes);
  // Links are full duplex: a node's busier direction bounds it.
  for (const l of links) l.seconds = Math.max(l.inBytes, l.outBytes) / rates.linkBytesPerSecond;
  return links;
}

/** Times every stage of the run the layout describes and names the slowest. */
export function plan(layout: Layout, rates: Rates): Plan {
  const T = layout.tokensPerSae;
  const producerGpuSeconds = T / producerRate(layout, rates);
  const trainerSeconds = trainerWork(layout, rates);
  const shardPlans = shardTraffic(layout, rates);
  const links = nodeLinks(layout, rates, shardPlans);
  const seconds: Record<Stage, number> = {
    producers: producerGpuSeconds / layout.producers,
    trainers: Math.max(...trainerSeconds),
    buffers: Math.max(...shardPlans.map((s) => s.seconds)),
    links: Math.max(...links.map((l) => l.seconds)),
  };
  const bottleneck = (Object.keys(seconds) as Stage[]).reduce((a, b) => (seconds[a] >= seconds[b] ? a : b));
  const nodes = (kind: NodeLink["kind"]) => new Set(links.filter((l) => l.kind === kind).map((l) => l.node)).size;
  return {
    saes: layout.trainers.reduce((n, t) => n + t.hookPoints.length * layout.widths.length, 0),
    producerGpuSeconds,
    trainerGpuSeconds: trainerSeconds.reduce((a, b) => a + b, 0),
    trainerSeconds,
    shardPlans,
    links,
    nodes: { producer: nodes("producer"), trainer: nodes("trainer"), buffer: nodes("buffer") },
    seconds,
    runSeconds: seconds[bottleneck],
    bottleneck,
    bytesIn: shardPlans.reduce((s, p) => s + p.inBytes, 0),
    bytesOut: shardPlans.reduce((s, p) => s + p.outBytes, 0),
  };
}
