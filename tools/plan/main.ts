import { parseArgs } from "node:util";
import { ConfigError, loadConfig } from "../../services/common/config/index.js";
import { layoutOf } from "./layout.js";
import { plan } from "./model.js";
import { planText } from "./print.js";
import { DEFAULT_RATES, ratesFromBench, ratesFromFile } from "./rates.js";

const USAGE = `usage: saeflow plan CONFIG [--gpus N] [--shards N] [--bench BENCH_OUTPUT] [--rates RATES.yaml] [--set key=value ...]

  Lays a run out on a cluster from its config and per-stage rates: pods, GPUs, memory per buffer
  shard, bandwidth per link, time to train every SAE, and which stage bounds it.
  --gpus     GPUs to share between producers and trainers (default 64)
  --shards   buffer shards, when the config does not say (default 1)
  --bench    the output of \`npm run bench\` on the cluster's nodes: its last line's rates replace the defaults
  --rates    a YAML or JSON file of rates (see tools/plan/rates.ts), applied last
`;

/** `saeflow plan`: prints the plan and returns the exit code. */
export function planCommand(argv: string[], write: (text: string) => void = (t) => process.stdout.write(t)): number {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      gpus: { type: "string", default: "64" },
      shards: { type: "string", default: "1" },
      bench: { type: "string" },
      rates: { type: "string" },
      set: { type: "string", multiple: true, default: [] },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help || positionals.length !== 1) {
    write(USAGE);
    return values.help ? 0 : 2;
  }
  const gpus = Number(values.gpus);
  const shards = Number(values.shards);
  if (!Number.isInteger(gpus) || gpus < 2)
    throw new ConfigError([{ key: "--gpus", message: `${values.gpus}: needs a whole number of at least 2` }]);
  if (!Number.isInteger(shards) || shards < 1)
    throw new ConfigError([{ key: "--shards", message: `${values.shards}: needs a whole number of at least 1` }]);
  const config = loadConfig({ file: positionals[0], env: process.env, sets: values.set });
  let rates = DEFAULT_RATES;
  if (values.bench) rates = ratesFromBench(values.bench, rates);
  if (values.rates) rates = ratesFromFile(values.rates, rates);
  const layout = layoutOf(config, shards);
  write(`${planText(layout, rates, plan(layout, rates, gpus))}\n`);
  return 0;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  try {
    process.exitCode = planCommand(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`saeflow plan: ${(err as Error).message}\n`);
    process.exitCode = err instanceof ConfigError ? 2 : 1;
  }
}
