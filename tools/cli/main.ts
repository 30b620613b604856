import { statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { ConfigError, loadConfig, type RunConfig } from "../../services/common/config/index.js";
import { evalTable, evaluateRun } from "../eval/run.js";
import { planCommand } from "../plan/main.js";
import { exportRun } from "./export.js";
import { pretokenize, TOKENS_FIELD } from "./pretokenize.js";
import { writeReport } from "./report.js";
import { cliConfig, readRunFile } from "./run-file.js";
import { collectStatus, statusJson, statusTable } from "./status.js";
import { stopTrainer } from "./control.js";
import { trainerDirs, type UpResult, up } from "./up.js";

const USAGE = `usage: saeflow <command> [options]

  up CONFIG [--set key=value ...]   start a whole run on this machine (NATS, buffer, producers, trainers)
     [--tls]                        ... with mTLS on every gRPC call and NATS over TLS, from a CA made for the run
  status [RUN_DIR] [--json]         one table of every service's status (default: runs/local)
  stop [RUN_DIR]                    checkpoint and export the trainers, then drain the run
  export [RUN_DIR]                  write the SAELens export of each SAE from its latest checkpoint
  report [RUN_DIR]                  draw the run into RUN_DIR/report.html
  pretokenize CONFIG OUT.jsonl      tokenize the config's producer.dataset once into JSONL records of token
     [--set key=value ...]          ids; train on them with producer.dataset=[OUT], producer.tokensField=input_ids
  plan CONFIG [--set key=value ...] lay the run out on a cluster: pods, GPUs, memory per buffer shard,
     [--rates FILE] [--bench FILE]  bandwidth per link, time to train every SAE, what saturates first
`;

const root = resolve(import.meta.dirname, "../..");

function fail(message: string, code = 2): never {
  process.stderr.write(`saeflow: ${message}\n`);
  process.exit(code);
}

const say = (line: string) => process.stderr.write(`saeflow: ${line}\n`);

/** A run that never trained has nothing to evaluate or report; one a role refused the config of exits 2. */
async function upCommand(file: string | undefined, sets: string[], tls: boolean): Promise<number> {
  if (!file) fail("up needs a CONFIG file, e.g. saeflow up deploy/configs/local.yaml");
  const config = loadConfig({ file, env: process.env, sets });
  const result = await up(root, config, { tls });
  if (!result.trained) {
    say(`the run ended before any trainer trained a step: no evaluation, no report (logs in ${join(result.runDir, "logs")})`);
    return Object.values(result.exits).includes(2) ? 2 : 1;
  }
  if (result.completed && config.launch.evaluate) await evaluate(result, config);
  if (config.launch.report) say(`report ${await writeReport(result.runDir)}`);
  say(`run folder ${result.runDir}`);
  return result.completed ? 0 : 1;
}

async function evaluate(result: UpResult, config: RunConfig): Promise<void> {
  say("evaluating each SAE spliced into the model");
  for (const dir of result.trainerDirs) {
    const rows = await evaluateRun(dir, { ...config, run: { ...config.run, dir } }, { root, log: say });
    process.stderr.write(`${evalTable(rows)}\n`);
  }
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  // plan has flags of its own (--rates, --bench) and reads no run folder.
  if (command === "plan") return planCommand(rest);
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: {
      set: { type: "string", multiple: true, default: [] },
      json: { type: "boolean" },
      tls: { type: "boolean", default: false },
      help: { type: "boolean", short: "h" },
    },
  });
  if (!command || values.help || ["help", "--help", "-h"].includes(command)) {
    process.stdout.write(USAGE);
    return command ? 0 : 2;
  }
  const runDir = resolve(positionals[0] ?? "runs/local");
  switch (command) {
    case "up":
      return upCommand(positionals[0], values.set, values.tls);
    case "status": {
      const run = readRunFile(runDir);
      const st = await collectStatus(run, cliConfig(run).transport);
      process.stdout.write(values.json ? `${JSON.stringify(statusJson(st), null, 2)}\n` : `${statusTable(st)}\n`);
      return 0;
    }
    case "stop": {
      const run = readRunFile(runDir);
      const transport = cliConfig(run).transport;
      const stopped = await Promise.all(run.services.filter((s) => s.role === "trainer").map((s) => stopTrainer(s.address, transport)));
      if (!stopped.every(Boolean)) return 1;
      say("trainers checkpointed and stopped; the run drains and exits");
      return 0;
    }
    case "export": {
      const run = readRunFile(runDir);
      // A JumpReLU export pulls calibration batches from the buffer, as a trainer does.
      const config = cliConfig(run, "exporter");
      for (const path of await exportRun(config, trainerDirs(runDir, config), (l) => process.stderr.write(`saeflow: ${l}\n`)))
        process.stdout.write(`${path}\n`);
      return 0;
    }
    case "pretokenize": {
      const [file, out] = positionals;
      if (!file || !out)
        fail("pretokenize needs a CONFIG file and an OUT file, e.g. saeflow pretokenize deploy/configs/local.yaml corpus.jsonl");
      if (!out.toLowerCase().endsWith(".jsonl")) fail(`pretokenize: OUT ${out} must end in .jsonl, so that producers read it as JSONL`);
      if (!statSync(dirname(resolve(out)), { throwIfNoEntry: false })?.isDirectory())
        fail(`pretokenize: OUT ${out} is in ${dirname(out)}, which is not a folder; make it first or write elsewhere`);
      const config = loadConfig({ file, env: process.env, sets: values.set });
      const { documents, tokens } = await pretokenize(config.producer, resolve(out), say);
      say(`wrote ${documents} documents, ${tokens} tokens to ${out}`);
      say(`train on it with --set 'producer.dataset=${JSON.stringify([out])}' --set producer.tokensField=${TOKENS_FIELD}`);
      return 0;
    }
    case "report":
      process.stdout.write(`${await writeReport(runDir)}\n`);
      return 0;
    default:
      fail(`unknown command "${command}"\n${USAGE}`);
  }
}

try {
  process.exitCode = await main(process.argv.slice(2));
} catch (err) {
  if (err instanceof ConfigError) fail(err.message);
  fail((err as Error).message, 1);
}
