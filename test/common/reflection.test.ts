import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { status as grpcStatus } from "@grpc/grpc-js";
import { RunConfigSchema } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import { ProducerService } from "../../services/gen/saeflow/producer/v1/producer_pb.js";
import { ReflectionClient } from "../support/reflection-client.js";

// The grpcurl path (list, describe, call -d JSON) proven against a real server on loopback.
describe("server reflection, as grpcurl uses it", () => {
  let server: RunningServer;
  let client: ReflectionClient;
  before(async () => {
    server = await startServer("127.0.0.1:0", RunConfigSchema.parse({}).transport, [
      bind(ProducerService, {
        status: async () => ({ state: ServiceState.RUNNING, producerId: "p-7", tokens: 1234n, hookPoints: ["blocks.1.hook_resid_post"] }),
        pause: async () => ({ state: ServiceState.PAUSED }),
        resume: async () => {
          throw new FieldError("state", "not paused", grpcStatus.FAILED_PRECONDITION);
        },
      }),
    ]);
    client = new ReflectionClient(server.address);
  });
  after(async () => {
    client.close();
    await server.close();
  });

  it("lists the role's service, health and reflection", async () => {
    const services = await client.list();
    for (const name of ["saeflow.producer.v1.ProducerService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"]) {
      assert.ok(services.includes(name), `${name} missing from ${services.join(", ")}`);
    }
  });

  it("describes a service with its methods, message fields and .proto comments", async () => {
    const svc = await client.describe("saeflow.producer.v1.ProducerService");
    assert.deepEqual(
      svc.methods.map((m) => m.name),
      ["Status", "Pause", "Resume"],
    );
    const status = svc.methods[0]!;
    assert.equal(status.output.typeName, "saeflow.producer.v1.StatusResponse");
    assert.ok(status.output.fields.some((f) => f.name === "tokens_per_second"));
    const file = client.fileOf("saeflow/producer/v1/producer.proto");
    const comments = file?.sourceCodeInfo?.location.map((l) => l.leadingComments).join(" ") ?? "";
    assert.match(comments, /Tokens produced, throughput and dataset position/);
  });

  it("calls a method with JSON and returns JSON", async () => {
    const res = (await client.call("saeflow.producer.v1.ProducerService", "Status", {})) as Record<string, unknown>;
    assert.equal(res.state, "SERVICE_STATE_RUNNING");
    assert.equal(res.producerId, "p-7");
    assert.equal(res.tokens, "1234");
    const paused = (await client.call("saeflow.producer.v1.ProducerService", "Pause", {})) as Record<string, unknown>;
    assert.equal(paused.state, "SERVICE_STATE_PAUSED");
  });

  it("returns the handler's status and field for a refused call", async () => {
    await assert.rejects(client.call("saeflow.producer.v1.ProducerService", "Resume", {}), (err: { code: number; details: string }) => {
      assert.equal(err.code, grpcStatus.FAILED_PRECONDITION);
      assert.match(err.details, /^state: not paused/);
      return true;
    });
  });

  it("reports health through grpc.health.v1 as JSON", async () => {
    assert.deepEqual(await client.call("grpc.health.v1.Health", "Check", { service: "" }), { status: "NOT_SERVING" });
  });
});
