import type { Layout, Plan, Rates } from "./model.js";
import { trainerRate } from "./model.js";

const gib = (b: number) => `${(b / 2 ** 30).toFixed(1)} GiB`;
const gbps = (b: number) => `${(b / 1e9).toFixed(2)} GB/s`;
const tb = (b: number) => `${(b / 1e12).toFixed(1)} TB`;
const hours = (s: number) => (s >= 3600 ? `${(s / 3600).toFixed(1)} h` : `${(s / 60).toFixed(1)} min`);

/** The plan as a person reads it: what to run, how long each stage takes, what bounds the run, and where every rate came from. */
export function planText(layout: Layout, rates: Rates, p: Plan): string {
  const saes = layout.hooks.reduce((n, h) => n + h.widths.length, 0);
  const widths = [...new Set(layout.hooks.flatMap((h) => h.widths))].sort((a, b) => a - b);
  const lines = [
    `run: ${saes} SAE(s) on ${layout.hooks.filter((h) => h.widths.length).length} of ${layout.hooks.length} hook point(s), ${(layout.tokensPerSae / 1e6).toFixed(0)}M tokens each, ${layout.dtypeBytes}-byte activations`,
    "",
    "pods",
    `  producers    ${p.producerGpus} GPU(s)   ${hours(p.producerGpuSeconds)} GPU-time   ${hours(p.seconds.producers)} with these GPUs`,
    `  trainers     ${p.trainerGpus} GPU(s)   ${hours(p.trainerGpuSeconds)} GPU-time   ${hours(p.seconds.trainers)} with these GPUs`,
    ...widths.map((w) => `               ${w} latents: ${(trainerRate(rates, w) / 1e3).toFixed(1)}k tok/s per GPU`),
    `  buffers      ${layout.shards} shard(s), one per node   ${hours(p.seconds.buffers)} at ${gbps(rates.bufferBytesPerSecond)} per shard`,
    `  nodes        ${p.nodes} GPU node(s) of ${rates.gpusPerNode} + ${layout.shards} buffer node(s)`,
    "",
    "buffer shards",
    ...p.shardPlans.map(
      (s) =>
        `  shard ${s.shard}: ${s.hooks} pool(s), ${gib(s.poolBytes)}${s.poolBytes > rates.bufferNodeBytes ? " (more than a node holds)" : ""}, in ${gbps(s.inBytesPerSecond)}, out ${gbps(s.outBytesPerSecond)}`,
    ),
    "",
    "links (at the run's pace)",
    `  producer node  ${gbps(p.producerLinkBytesPerSecond)} out   trainer node  ${gbps(p.trainerLinkBytesPerSecond)} in   (${gbps(rates.linkBytesPerSecond)} each way per link)`,
    `  activations    ${tb(p.bytesIn)} into the buffers, ${tb(p.bytesOut)} out; ${hours(p.seconds.links)} on the busiest link`,
    "",
    `time to train every SAE: ${hours(p.runSeconds)}, bounded by the ${p.bottleneck}`,
    "",
    "rates",
    ...Object.entries(rates.sources).map(([k, v]) => `  ${k}: ${v}`),
  ];
  return lines.join("\n");
}
