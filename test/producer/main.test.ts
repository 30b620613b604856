import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, before, describe, it } from "node:test";
import { MemberAnnounce } from "../../services/common/coordination.js";
import { paragraphs, RUN_ID, startWorld, type World, writeDataset } from "./harness.js";

// main.ts as a process: config file plus --set, joins, produces, and on SIGTERM leaves the run
// cleanly with its position saved.
describe("producer main", () => {
  let world: World;
  before(async () => {
    world = await startWorld();
  });
  after(() => world.close());

  it("runs from --config and --set, and leaves the run on SIGTERM", async () => {
    const data = writeDataset(world.dir, "m", { "a.txt": paragraphs(30) });
    const file = join(world.dir, "run.yaml");
    const config = world.config({ dataset: [data], hookPoints: ["blocks.1.hook_resid_post"], contextLength: 16, batchContexts: 2 });
    writeFileSync(file, JSON.stringify({ run: config.run, nats: config.nats, buffer: config.buffer, producer: config.producer }));
    const seen: Record<string, string[]> = { join: [], leave: [] };
    for (const what of ["join", "leave"] as const) {
      world.demand.bus.subscribe(world.demand.subjects[what], MemberAnnounce, (m) => seen[what]!.push(m.producerId));
    }
    await world.demand.bus.flush();
    await world.demand.grant({ "main-test": 1e12 });

    const child = spawn(
      process.execPath,
      ["--import", "tsx", "services/producer/main.ts", "--config", file, "--set", "producer.id=main-test"],
      {
        stdio: ["ignore", "ignore", "pipe"],
      },
    );
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
    await world.buffer.until(() => world.buffer.chunks().length >= 3, "chunks from the process");
    child.kill("SIGTERM");
    assert.equal(await exited, 0, stderr);
    assert.deepEqual(seen.join, ["main-test"]);
    assert.deepEqual(seen.leave, ["main-test"]);
    assert.ok(world.buffer.chunks().every((c) => c.producerId === "main-test" && c.runId === RUN_ID));
    assert.ok(existsSync(join(config.run.dir, "main-test.position.json")));
    assert.match(stderr, /producer: main-test serving control on 127\.0\.0\.1:\d+/);
  });

  it("exits 2 naming the key on a bad config", async () => {
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "services/producer/main.ts", "--set", "producer.tokenizer=/nonexistent/tokenizer.json"],
      {
        stdio: ["ignore", "ignore", "pipe"],
      },
    );
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    const code = await new Promise<number | null>((resolve) => child.once("exit", (c) => resolve(c)));
    assert.equal(code, 2);
    assert.match(stderr, /producer\.tokenizer: tokenizer file \/nonexistent\/tokenizer\.json does not exist/);
  });
});
