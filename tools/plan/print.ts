import type { Layout, NodeLink, Plan, Rates, ShardPlan, Stage } from "./model.js";
import { producerRate, trainerRate } from "./model.js";

const gib = (b: number) => (b >= 2 ** 30 ? `${(b / 2 ** 30).toFixed(1)} GiB` : `${(b / 2 ** 20).toFixed(1)} MiB`);
const gbps = (b: number) => (b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB/s` : `${(b / 1e6).toFixed(1)} MB/s`);
const tb = (b: number) => `${(b / 1e12).toFixed(1)} TB`;
const time = (s: number) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : s >= 60 ? `${(s / 60).toFixed(1)} min` : `${s.toFixed(1)} s`);
const pct = (x: number) => `${Math.round(x * 100)}%`;

const STAGE_WHAT: Record<Stage, string> = {
  producers: "the producers' GPUs (forward passes)",
  trainers: "the busiest trainer process's GPU",
  buffers: "the busiest buffer shard's bandwidth",
  links: "the busiest node's network link",
};

/** 0,1,2,5 as "0-2,5". */
function ranges(xs: number[]): string {
  const out: string[] = [];
  for (let i = 0; i < xs.length;) {
    let j = i;
    while (j + 1 < xs.length && xs[j + 1] === xs[j]! + 1) j++;
    out.push(j > i ? `${xs[i]}-${xs[j]}` : `${xs[i]}`);
    i = j + 1;
  }
  return out.join(",");
}

/** Shards with the same figures are printed as one line, so a run of 32 like shards stays readable. */
function shardLines(shards: ShardPlan[], rates: Rates, run: number): string[] {
  const key = (s: ShardPlan) => [s.pools, s.poolBytes, s.inBytes, s.outBytes, s.unfed.join(",")].join("/");
  const groups = new Map<string, ShardPlan[]>();
  for (const s of shards) groups.set(key(s), [...(groups.get(key(s)) ?? []), s]);
  return [...groups.values()].map((g) => {
    const s = g[0]!;
    const which = g.length === 1 ? `shard ${s.shard}` : `shards ${ranges(g.map((x) => x.shard))}`;
    const over = s.poolBytes > rates.bufferNodeBytes ? " (more than a buffer node holds)" : "";
    const unfed = s.unfed.length ? `; no producer pushes ${s.unfed.join(", ")} here` : "";
    return `  ${which}: ${s.pools} pool(s), ${gib(s.poolBytes)}${over}, in ${gbps(s.inBytes / run)}, out ${gbps(s.outBytes / run)}, busy ${pct(s.seconds / run)}${unfed}`;
  });
}

function linkLines(links: NodeLink[], rates: Rates, run: number): string[] {
  return (["producer", "trainer", "buffer"] as const)
    .map((kind) => {
      const of = links.filter((l) => l.kind === kind);
      const busiest = of.reduce((a, b) => (b.seconds > a.seconds ? b : a));
      return (
        `  ${kind} node (${of.length})`.padEnd(24) +
        `in ${gbps(busiest.inBytes / run)}, out ${gbps(busiest.outBytes / run)}, busy ${pct(busiest.seconds / run)}`
      );
    })
    .concat(`  each link carries ${gbps(rates.linkBytesPerSecond)} each way`);
}

/** The plan as a person reads it: what to run, how long each stage takes, what saturates first, and where every rate came from. */
export function planText(layout: Layout, rates: Rates, p: Plan): string {
  const run = p.runSeconds;
  const trained = new Set(layout.trainers.flatMap((t) => t.hookPoints));
  const perTrainer = layout.trainers.map((t) => t.hookPoints.length);
  const stages = (Object.keys(p.seconds) as Stage[]).sort((a, b) => p.seconds[b] - p.seconds[a]);
  const lines = [
    `run: ${p.saes} SAE(s) (${layout.widths.length} per hook point) on ${trained.size} of ${layout.pools.length} pool(s), ${(layout.tokensPerSae / 1e6).toFixed(0)}M tokens each, ${layout.dtypeBytes}-byte activations`,
    "",
    "pods",
    `  producers   ${layout.producers} pod(s), 1 GPU each   ${time(p.producerGpuSeconds)} GPU-time`,
    `              ${layout.producerLayers} of ${rates.modelLayers} layers: ${(producerRate(layout, rates) / 1e3).toFixed(1)}k tok/s per GPU`,
    `  trainers    ${layout.trainers.length} pod(s), 1 GPU each   ${time(p.trainerGpuSeconds)} GPU-time, ${Math.min(...perTrainer)}-${Math.max(...perTrainer)} hook point(s) each`,
    ...layout.widths.map((w) => `              ${w} latents: ${(trainerRate(rates, w) / 1e3).toFixed(1)}k tok/s per GPU`),
    `  buffers     ${layout.shards} shard(s), no GPU`,
    `  GPUs        ${layout.producers + layout.trainers.length}`,
    `  nodes       ${p.nodes.producer} producer node(s) of ${rates.producersPerNode}, ${p.nodes.trainer} trainer node(s) of ${rates.trainersPerNode}, ${p.nodes.buffer} buffer node(s) of ${rates.buffersPerNode} shards`,
    "",
    "buffer shards (memory: pools only; the chart adds buffer.memoryOverheadMiB)",
    ...shardLines(p.shardPlans, rates, run),
    "",
    "links (busiest node of each kind, at the run's pace)",
    ...linkLines(p.links, rates, run),
    `  activations ${tb(p.bytesIn)} into the buffers, ${tb(p.bytesOut)} out`,
    "",
    "time of each stage alone (what saturates first: the longest)",
    ...stages.map((s) => `  ${s.padEnd(10)} ${time(p.seconds[s]).padStart(9)}   ${STAGE_WHAT[s]}`),
    "",
    `time to train every SAE: ${time(run)}, bounded by ${STAGE_WHAT[p.bottleneck]}`,
    "",
    "rates",
    ...Object.entries(rates.sources).map(([k, v]) => `  ${k}: ${v}`),
  ];
  return lines.join("\n");
}
