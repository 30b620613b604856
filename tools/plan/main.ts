import { parseArgs } from "node:util";
import { ConfigError, loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { layoutOf } from "./layout.js";
import { plan } from "./model.js";
import { planText } from "./print.js";
import { configFromValues } from "./values.js";
import { DEFAULT_RATES, ratesFromBench, ratesFromFile } from "./rates.js";

export const PLAN_USAGE = `usage: saeflow plan CONFIG [--set key=value ...] [--rates RATES.yaml] [--bench BENCH_OUTPUT]
       saeflow plan --values CHART_VALUES.yaml [...]

  Lays a run out on a cluster from its config and per-stage rates: pods, GPUs, memory per buffer
  shard, bandwidth per link, time to train every SAE, and which stage saturates first. The config
  says the layout: buffer.shards (or one shard), producer.shardCount producers (launch.producers if
  more, as saeflow up starts them), trainer.shardCount (or launch.trainers) trainer processes over trainer.hookPoints, the sweep trainer.saes, trainer.steps x batchSize tokens.
  --values   a values file of deploy/helm/saeflow instead of CONFIG: its config, with the replicas and
             shard table the chart derives from it
  --set      override a config key, as saeflow up takes it
  --rates    a YAML or JSON file of rates (keys of tools/plan/rates.ts), applied last
  --bench    the output of \`npm run bench\` on the cluster's nodes: its last line's rates replace the defaults
`;

/** parseArgs' complaint about a flag, as a ConfigError naming the flag. */
function flagError(err: unknown): unknown {
  const { code, message } = err as { code?: string; message: string };
  const flag = /'(-[^' ]+)/.exec(message)?.[1];
  if (!flag) return err;
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION") return ConfigError.at(flag, "unknown option; plan takes --set, --rates, --bench, --values");
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE") return ConfigError.at(flag, "needs a value");
  return ConfigError.at(flag, message);
}

/** A run config laid out as `saeflow up` launches it: launch.producers and launch.trainers processes, unless the config says more. */
function asLaunched(config: RunConfig): RunConfig {
  return {
    ...config,
    producer: { ...config.producer, shardCount: Math.max(config.producer.shardCount, config.launch.producers) },
    trainer: { ...config.trainer, shardCount: Math.max(config.trainer.shardCount, config.launch.trainers) },
  };
}

/** `saeflow plan`: prints the plan and returns the exit code; a bad flag, config or rates file throws ConfigError. */
export function planCommand(argv: string[], write: (text: string) => void = (t) => process.stdout.write(t)): number {
  let parsed;
  try {
    parsed = parseArgs({
      args: argv,
      allowPositionals: true,
      options: {
        bench: { type: "string" },
        rates: { type: "string" },
        values: { type: "string" },
        set: { type: "string", multiple: true, default: [] },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    throw flagError(err);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    write(PLAN_USAGE);
    return 0;
  }
  const files = positionals.length + (values.values ? 1 : 0);
  if (files !== 1) throw ConfigError.at("CONFIG", `plan takes one config file or --values, got ${files}\n${PLAN_USAGE}`);
  const config = values.values
    ? configFromValues(values.values, values.set)
    : asLaunched(loadConfig({ file: positionals[0], env: process.env, sets: values.set }));
  let rates = DEFAULT_RATES;
  if (values.bench) rates = ratesFromBench(values.bench, rates);
  if (values.rates) rates = ratesFromFile(values.rates, rates);
  const layout = layoutOf(config);
  write(`${planText(layout, rates, plan(layout, rates))}\n`);
  return 0;
}
