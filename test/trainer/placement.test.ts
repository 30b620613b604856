import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { resolve } from "node:path";
import { test } from "node:test";
import { CASES } from "./placement-cases.js";
import { webgpuEnv } from "./webgpu.js";

const root = resolve(import.meta.dirname, "../..");

/**
 * What onnxruntime may leave on the CPU inside a WebGPU step: shape computations (Shape, and k x B,
 * the kept count BatchTopK's TopK is fed while k anneals) and the dead-latent ids AuxK is fed from
 * the host, made a column there (n_dead_rows). Anything else on the CPU would copy data between
 * the device and the host every step.
 */
const ALLOWED_OPS = new Set(["Shape"]);
const ALLOWED_NODES = new Set(["n_kept_count", "n_dead_rows"]);

/** Per case, the nodes onnxruntime's verbose log says it placed on the CPU ("OpType (name)"). */
function cpuNodes(log: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const part of log.split(/\n== /).slice(1)) {
    const name = part.slice(0, part.indexOf("\n"));
    const nodes: string[] = [];
    let onCpu = false;
    for (const line of part.split("\n")) {
      const placed = /Node\(s\) placed on \[(\w+)\]/.exec(line);
      const node = /VerifyEachNodeIsAssignedToAnEp\]\s{3}(\S+ \(\S+\))/.exec(line);
      if (placed) onCpu = placed[1] === "CPUExecutionProvider";
      else if (!node) onCpu = false;
      else if (onCpu) nodes.push(node[1]!);
    }
    out.set(name, nodes);
  }
  return out;
}

test(
  "every trainer graph runs on WebGPU but for shape ops and the host-fed dead ids, as onnxruntime's verbose log places them",
  { timeout: 180_000 },
  async () => {
    const child = spawn(process.execPath, ["--import", "tsx", "test/trainer/placement-child.ts"], {
      cwd: root,
      env: { ...process.env, ...webgpuEnv() },
      stdio: ["ignore", "ignore", "pipe"],
    });
    let log = "";
    child.stderr.on("data", (d: Buffer) => (log += d.toString()));
    const code = await new Promise<number | null>((r) => child.once("close", r));
    assert.equal(code, 0, log.slice(-4000));
    const placed = cpuNodes(log);
    const expected = [...Object.keys(CASES).map((c) => `step: ${c}`), "copy: gated", "copy: jumprelu_trained", "calibrate", "done"];
    assert.deepEqual([...placed.keys()], expected);
    for (const [name, nodes] of placed) {
      const stray = nodes.filter((n) => {
        const [, op, node] = /^(\S+) \((\S+)\)$/.exec(n)!;
        return !ALLOWED_OPS.has(op!) && !ALLOWED_NODES.has(node!);
      });
      assert.deepEqual(stray, [], `${name}: on the CPU: ${nodes.join(", ")}`);
    }
    assert.match(log, /placed on \[WebGpuExecutionProvider\]/);
  },
);
