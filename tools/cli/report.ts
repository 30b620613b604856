import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import * as vega from "vega";
import { compile, type TopLevelSpec } from "vega-lite";
import type { HookLedger } from "./ledger.js";

/**
 * `saeflow report RUN_DIR`: one self-contained HTML page (inline SVG charts drawn with Vega-Lite,
 * no scripts, no network) from the run's metrics.jsonl files, pipeline.jsonl and eval.json.
 */
type Row = Record<string, number | string>;

function findFiles(dir: string, name: string): string[] {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((entry) => {
    const p = join(dir, entry);
    if (statSync(p).isDirectory()) return entry === "logs" ? [] : findFiles(p, name);
    return entry === name ? [p] : [];
  });
}

function readJsonl(path: string): Row[] {
  return readFileSync(path, "utf8")
    .split("\n")
    .filter((l) => l.trim())
    .flatMap((l) => {
      try {
        return [JSON.parse(l) as Row];
      } catch {
        return []; // a line cut by a crash mid-write
      }
    });
}

async function svg(spec: TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(compile(spec).spec), { renderer: "none" });
  return view.toSVG();
}

function lineChart(title: string, values: Row[], x: string, y: string, color?: string, yScale: "linear" | "log" = "linear"): TopLevelSpec {
  return {
    title,
    width: 420,
    height: 220,
    data: { values },
    mark: { type: "line", point: values.length < 60 },
    encoding: {
      x: { field: x, type: "quantitative" },
      y: { field: y, type: "quantitative", scale: yScale === "log" ? { type: "log" } : { zero: false } },
      ...(color ? { color: { field: color, type: "nominal" } } : {}),
    },
  } as TopLevelSpec;
}

const escape = (s: string) => s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]!);

function table(rows: Row[]): string {
  if (!rows.length) return "";
  const cols = Object.keys(rows[0]!);
  const cell = (v: unknown) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : escape(String(v)));
  return `<table><tr>${cols.map((c) => `<th>${escape(c)}</th>`).join("")}</tr>${rows
    .map((r) => `<tr>${cols.map((c) => `<td>${cell(r[c])}</td>`).join("")}</tr>`)
    .join("")}</table>`;
}

/** final-status.json's ledger (saeflow up writes it), one row per hook point of each shard, reasons spread into columns. */
function ledgerRows(runDir: string): Row[] {
  const file = join(runDir, "final-status.json");
  if (!existsSync(file)) return [];
  const { ledger = [] } = JSON.parse(readFileSync(file, "utf8")) as { ledger?: HookLedger[] };
  return ledger.map((l) => ({
    shard: l.shard,
    hook_point: l.hookPoint,
    produced: l.produced,
    accepted: l.accepted,
    ...Object.fromEntries(Object.entries(l.refused).map(([k, v]) => [`refused ${k}`, v])),
    served: l.served,
    held: l.held,
    ...Object.fromEntries(Object.entries(l.lost).map(([k, v]) => [k, v])),
    reconciles: l.producedReconciles && l.acceptedReconciles ? "yes" : "NO",
  }));
}

export async function writeReport(runDir: string): Promise<string> {
  // Named by folder (topk-k8, or trainer-1/topk-k8 when several trainers train the same sweep).
  const metrics = findFiles(runDir, "metrics.jsonl").flatMap((f) => readJsonl(f).map((r) => ({ ...r, sae: relative(runDir, dirname(f)) })));
  const pipelineFile = join(runDir, "pipeline.jsonl");
  const pipeline = existsSync(pipelineFile) ? readJsonl(pipelineFile) : [];
  const evaluation = findFiles(runDir, "eval.json").flatMap((f) => {
    const where = relative(runDir, dirname(f));
    return (JSON.parse(readFileSync(f, "utf8")) as Row[]).map((r) => (where ? { ...r, sae: `${where}/${String(r.sae)}` } : r));
  });
  if (!metrics.length && !pipeline.length) throw new Error(`${runDir} holds no metrics.jsonl or pipeline.jsonl to draw`);

  const charts: string[] = [];
  if (metrics.length) {
    charts.push(await svg(lineChart("Loss (MSE + auxiliary)", metrics, "step", "loss", "sae", "log")));
    charts.push(await svg(lineChart("Explained variance", metrics, "step", "explained_variance", "sae")));
    charts.push(await svg(lineChart("L0 (active latents per token)", metrics, "step", "l0", "sae")));
    charts.push(await svg(lineChart("Dead latents (fraction)", metrics, "step", "dead_fraction", "sae")));
  }
  if (pipeline.length) {
    const long = pipeline.flatMap((r) => [
      { elapsedS: r.elapsedS!, series: "buffer fill", value: r.bufferFill! },
      { elapsedS: r.elapsedS!, series: "trainer wait (fraction of the last 5 s)", value: r.trainerWaitFraction! },
      { elapsedS: r.elapsedS!, series: "batches held for producers (fraction of wall)", value: r.bufferHoldFraction ?? 0 },
    ]);
    charts.push(await svg(lineChart("Buffer fill and trainer wait over time", long, "elapsedS", "value", "series")));
    charts.push(await svg(lineChart("Trainer throughput (tokens/s)", pipeline, "elapsedS", "trainerTokensPerS")));
  }
  const last = new Map<string, Row>();
  for (const r of metrics) last.set(String(r.sae), r);
  const summary = [...last.values()].map((r) => ({
    sae: r.sae!,
    step: r.step!,
    tokens: r.tokens!,
    mse: r.mse!,
    explained_variance: r.explained_variance!,
    l0: r.l0!,
    dead_fraction: r.dead_fraction!,
  }));
  const ledger = ledgerRows(runDir);
  const events = existsSync(join(runDir, "events.jsonl")) ? readJsonl(join(runDir, "events.jsonl")) : [];
  const html = `<!doctype html><html><head><meta charset="utf-8"><title>saeflow run ${escape(runDir)}</title>
<style>body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}section{display:flex;flex-wrap:wrap;gap:16px}
table{border-collapse:collapse;margin:12px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f4f4f4}</style></head>
<body><h1>saeflow run: ${escape(runDir)}</h1>
<h2>Final metrics per SAE</h2>${table(summary)}
${evaluation.length ? `<h2>Splice evaluation (LM loss with the SAE in the model)</h2>${table(evaluation)}` : ""}
${ledger.length ? `<h2>Rows ledger per hook point (produced = accepted + refused; accepted = served + held + lost)</h2>${table(ledger)}` : ""}
${events.length ? `<h2>Faults and restarts</h2>${table(events.map((e) => ({ t: "", who: "", event: "", ended: "", restart: "", seconds: "", ...e })))}` : ""}
<h2>Training</h2><section>${charts.join("\n")}</section></body></html>\n`;
  const out = join(runDir, "report.html");
  writeFileSync(out, html);
  return out;
}
