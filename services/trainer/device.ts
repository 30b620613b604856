import { spawnSync } from "node:child_process";
import ort from "onnxruntime-node";
import { ConfigError } from "../common/config/index.js";
import { RECIPES } from "../common/config/recipes.js";
import { openOrtSession, ortDeviceSessionOptions, ortSessionOptions } from "../common/ort.js";
import { F32, GraphBuilder, I64 } from "./graph/builder.js";
import type { HookConfig } from "./hook.js";
import { formatBytes, largestTensor, stateBytes, stepBytes } from "./memory.js";
import { type Placement, placementOf, PROVIDER_KEY } from "./placement.js";

/** What a trainer process needs of its device: every SAE's state (of every hook point) held at once, and one SAE's step at a time. */
export interface DeviceNeeds {
  /** Bytes of every SAE's weights and Adam moments. */
  state: number;
  /** Bytes the largest step holds beyond the state it reads. */
  step: number;
  /** The largest single tensor, which one device buffer must hold, and whose it is. */
  largest: { bytes: number; what: string; sae: string };
}

/**
 * What the sweeps of `hooks` (every hook point the process trains) need of its device, computed from
 * the config (while k anneals the step is dense, so both graphs count). Each hook point's Training
 * runs its steps on its own, so several steps may be in flight at once: one per hook point.
 */
export function deviceNeeds(hooks: readonly HookConfig[]): DeviceNeeds {
  let state = 0;
  let step = 0;
  let largest = { bytes: 0, what: "", sae: "" };
  for (const t of hooks) {
    const needs = sweepNeeds(t);
    state += needs.state;
    step += needs.step;
    const sae = hooks.length > 1 ? `${t.hookPoint}/${needs.largest.sae}` : needs.largest.sae;
    if (needs.largest.bytes > largest.bytes) largest = { ...needs.largest, sae };
  }
  return { state, step, largest };
}

/** What one hook point's sweep needs of its device. */
function sweepNeeds(t: HookConfig): DeviceNeeds {
  let state = 0;
  let step = 0;
  let largest = { bytes: 0, what: "", sae: "" };
  for (const sae of t.saes) {
    const recipe = RECIPES[sae.recipe].step;
    state += stateBytes(recipe, sae.width, t.dModel);
    const graphs = [false, ...(sae.kStart > sae.k ? [true] : [])].map((annealK) => ({
      recipe,
      batchSize: t.batchSize,
      dModel: t.dModel,
      width: sae.width,
      k: annealK ? sae.kStart : sae.k,
      annealK,
      prefixes: RECIPES[sae.recipe].nested ? sae.prefixes : [],
    }));
    for (const spec of graphs) {
      step = Math.max(step, stepBytes(spec));
      const big = largestTensor(spec);
      if (big.bytes > largest.bytes) largest = { ...big, sae: sae.name };
    }
  }
  return { state, step, largest };
}

const describeNeeds = (n: DeviceNeeds) =>
  `the sweep's state is ${formatBytes(n.state)} (weights and Adam moments, float32) and a step holds about ${formatBytes(n.step)} more; ` +
  `its largest tensor is ${n.largest.what} of ${n.largest.sae}, ${formatBytes(n.largest.bytes)}`;

/** A graph making zero-filled float32 tensors of any length. */
function zerosGraph(): Uint8Array {
  const g = new GraphBuilder("device_probe");
  const shape = g.input("shape", I64, [1]);
  g.output(g.op("Expand", [g.constF(0), shape], {}, "zeros"), "zeros", F32, ["n"]);
  return g.build();
}

/** A session that makes zero-filled float32 tensors of any length on a WebGPU device, to try allocations. */
async function allocator(place: Placement): Promise<{ take: (elements: number) => Promise<ort.Tensor>; release: () => Promise<void> }> {
  const session = await openOrtSession(zerosGraph(), ortDeviceSessionOptions(place, { zeros: "gpu-buffer" }), place.provider, PROVIDER_KEY);
  return {
    take: async (elements) => (await session.run({ shape: new ort.Tensor("int64", BigInt64Array.of(BigInt(elements)), [1]) })).zeros!,
    release: () => session.release(),
  };
}

/**
 * Tries, on a WebGPU device, the largest buffer the sweep needs, then as many more as the state and
 * one step need in all, and lets them go: WebGPU tells neither its memory nor its buffer limit in
 * advance, and a device that refuses now would refuse at the first step.
 */
async function probeWebGpu(place: Placement, needs: DeviceNeeds): Promise<void> {
  const probe = await allocator(place);
  const held: ort.Tensor[] = [];
  const fail = (what: string, err: unknown) =>
    ConfigError.at(
      PROVIDER_KEY,
      `webgpu ${what}: ${(err as Error).message.split("\n")[0]}; ${describeNeeds(needs)}. ` +
        `Lower trainer.batchSize or the SAEs' widths, or set ${PROVIDER_KEY}=cpu`,
    );
  try {
    try {
      held.push(await probe.take(needs.largest.bytes / 4));
    } catch (err) {
      throw fail(`cannot make one buffer of ${formatBytes(needs.largest.bytes)} for ${needs.largest.what} of ${needs.largest.sae}`, err);
    }
    let left = needs.state + needs.step - needs.largest.bytes;
    try {
      for (; left > 0; left -= needs.largest.bytes) held.push(await probe.take(Math.ceil(Math.min(left, needs.largest.bytes) / 4)));
    } catch (err) {
      throw fail(`cannot hold the ${formatBytes(needs.state + needs.step)} the sweep needs`, err);
    }
  } finally {
    for (const t of held) t.dispose();
    await probe.release();
  }
}

/** Free memory of CUDA device `id` in bytes, from nvidia-smi; undefined where it cannot be asked. */
function cudaFreeBytes(id: number): number | undefined {
  const out = spawnSync("nvidia-smi", ["--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", String(id)], { encoding: "utf8" });
  const mib = Number(out.stdout?.trim());
  return out.status === 0 && Number.isFinite(mib) ? mib * 2 ** 20 : undefined;
}

/**
 * The start-time check of the trainer's provider: opens a session there (a provider that cannot
 * load fails naming trainer.executionProvider) and refuses a device that cannot hold the sweep,
 * where that can be known: WebGPU by trying the allocations, CUDA by asking nvidia-smi for its free
 * memory. Returns what the sweep needs of its device, as a line for the log.
 */
export async function checkDevice(hooks: readonly HookConfig[]): Promise<string> {
  const place = placementOf(hooks[0]!);
  const needs = deviceNeeds(hooks);
  const line = `${place.provider}: ${describeNeeds(needs)}`;
  if (place.provider === "webgpu") await probeWebGpu(place, needs);
  if (place.provider !== "cuda") return line;
  await (await openOrtSession(zerosGraph(), ortSessionOptions(place), place.provider, PROVIDER_KEY)).release();
  const free = cudaFreeBytes(place.deviceId);
  if (free === undefined)
    return `${line}; the free memory of device ${place.deviceId} cannot be asked here (no nvidia-smi), so it was not checked`;
  if (free < needs.state + needs.step) {
    throw ConfigError.at(
      PROVIDER_KEY,
      `cuda device ${place.deviceId} has ${formatBytes(free)} free; ${describeNeeds(needs)}. Lower trainer.batchSize or the SAEs' widths`,
    );
  }
  return `${line}; device ${place.deviceId} has ${formatBytes(free)} free`;
}
