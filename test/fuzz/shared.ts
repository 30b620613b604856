import assert from "node:assert/strict";
import { create, type DescMessage, type DescService, fromBinary, toBinary } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import {
  Health,
  HealthCheckRequestSchema,
  HealthCheckResponseSchema,
  HealthCheckResponse_ServingStatus as Serving,
  HealthListRequestSchema,
} from "../../services/gen/grpc/health/v1/health_pb.js";
import * as v1 from "../../services/gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../services/gen/grpc/reflection/v1alpha/reflection_pb.js";
import {
  assertMalformedAnswer,
  HUGE,
  inParallel,
  malformed,
  namesAField,
  pathOf,
  type RawClient,
  type Rng,
  type Tally,
  unknownFields,
} from "./support.js";

/**
 * Health and reflection, served by every role from the same code: ≥ `perRpc` malformed messages to
 * each of Check, Watch, List and both reflection versions, half that do not parse and half hostile
 * values (unknown, empty and 1 MiB service names and symbols).
 */
export async function fuzzHealthAndReflection(
  raw: RawClient,
  role: string,
  roleService: string,
  perRpc: number,
  rng: Rng,
  tally: Tally,
): Promise<void> {
  await fuzzCheck(raw, role, roleService, perRpc, rng, tally);
  await fuzzWatch(raw, role, perRpc, rng, tally);
  const list = `${role} Health/List`;
  await inParallel(malformed(HealthListRequestSchema, {}, perRpc / 2, rng), 16, async (m) => {
    const answer = await raw.unary(pathOf(Health, "List"), m.bytes);
    assertMalformedAnswer(answer, m, list);
    tally.add(list, answer.code);
  });
  await inParallel(unknownFields(perRpc / 2, rng), 16, async (bytes) => {
    const answer = await raw.unary(pathOf(Health, "List"), bytes);
    assert.equal(answer.code, status.OK, answer.details);
    tally.add(list, answer.code);
  });
  for (const version of [v1, v1alpha]) await fuzzReflection(raw, role, version, perRpc, rng, tally);
}

const serviceNames = (roleService: string, rng: Rng) => [
  { name: rng.next() < 0.05 ? HUGE : `saeflow.${rng.int(1e9)}.Service`, known: false },
  { name: String.fromCharCode(...Array.from({ length: 1 + rng.int(64) }, () => 0x20 + rng.int(0xd000))), known: false },
  { name: "", known: true },
  { name: roleService, known: true },
];

async function fuzzCheck(raw: RawClient, role: string, roleService: string, perRpc: number, rng: Rng, tally: Tally): Promise<void> {
  const rpc = `${role} Health/Check`;
  await inParallel(malformed(HealthCheckRequestSchema, { service: roleService }, perRpc / 2, rng), 16, async (m) => {
    const answer = await raw.unary(pathOf(Health, "Check"), m.bytes);
    assertMalformedAnswer(answer, m, rpc);
    tally.add(rpc, answer.code);
  });
  const names = Array.from({ length: perRpc / 8 }, () => serviceNames(roleService, rng)).flat();
  await inParallel(names, 16, async ({ name, known }) => {
    const answer = await raw.unary(
      pathOf(Health, "Check"),
      toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: name })),
    );
    if (known) {
      assert.equal(answer.code, status.OK, answer.details);
    } else {
      assert.equal(answer.code, status.NOT_FOUND, answer.details.slice(0, 200));
      assert.ok(namesAField(answer.details, "service") && answer.details.length < 1100, answer.details.slice(0, 200));
    }
    tally.add(rpc, answer.code);
  });
}

async function fuzzWatch(raw: RawClient, role: string, perRpc: number, rng: Rng, tally: Tally): Promise<void> {
  const rpc = `${role} Health/Watch`;
  await inParallel(malformed(HealthCheckRequestSchema, { service: "x" }, perRpc / 2, rng), 16, async (m) => {
    const answer = await raw.serverStream(pathOf(Health, "Watch"), m.bytes);
    assertMalformedAnswer(answer, m, rpc);
    tally.add(rpc, answer.code);
  });
  // A watch of an unknown service answers SERVICE_UNKNOWN and waits for it to appear: the watcher leaves.
  const names = Array.from({ length: perRpc / 8 }, () => serviceNames("", rng)).flat();
  await inParallel(names, 16, async ({ name, known }) => {
    const bytes = toBinary(HealthCheckRequestSchema, create(HealthCheckRequestSchema, { service: name }));
    const answer = await raw.serverStream(pathOf(Health, "Watch"), bytes, 1);
    assert.equal(answer.messages.length, 1, `${status[answer.code]} ${answer.details}`);
    const first = fromBinary(HealthCheckResponseSchema, answer.messages[0]!).status;
    if (!known) assert.equal(first, Serving.SERVICE_UNKNOWN);
    tally.add(rpc, `message ${Serving[first]}`);
  });
}

type Version = typeof v1 | typeof v1alpha;

async function fuzzReflection(raw: RawClient, role: string, version: Version, perRpc: number, rng: Rng, tally: Tally): Promise<void> {
  const rpc = `${role} ${version.ServerReflection.typeName.split(".").slice(-2).join(".")}/ServerReflectionInfo`;
  const path = pathOf(version.ServerReflection, "ServerReflectionInfo");
  const schema: DescMessage = version.ServerReflectionRequestSchema;
  await inParallel(
    malformed(schema, { host: "h", messageRequest: { case: "listServices", value: "*" } }, perRpc / 2, rng),
    16,
    async (m) => {
      const answer = await raw.bidi(path, [m.bytes]);
      assertMalformedAnswer(answer, m, rpc);
      tally.add(rpc, answer.code);
    },
  );
  for (let sent = perRpc / 2; sent < perRpc; sent += 50) {
    const requests = Array.from({ length: 50 }, () => {
      const text = rng.next() < 0.04 ? HUGE : `saeflow.nowhere.${rng.int(1e9)}`;
      const messageRequest = rng.pick([
        { case: "fileByFilename" as const, value: text },
        { case: "fileContainingSymbol" as const, value: text },
        { case: "fileContainingExtension" as const, value: { containingType: text, extensionNumber: rng.int(2 ** 31) } },
        { case: "allExtensionNumbersOfType" as const, value: text },
        { case: undefined, value: undefined },
      ]);
      return toBinary(schema, create(schema, { host: rng.next() < 0.5 ? "" : "x".repeat(rng.int(4096)), messageRequest }));
    });
    const answer = await raw.bidi(path, requests);
    assert.equal(answer.code, status.OK, answer.details);
    assert.equal(answer.messages.length, requests.length, "one answer per request");
    for (const bytes of answer.messages) {
      const res = fromBinary(version.ServerReflectionResponseSchema as typeof v1.ServerReflectionResponseSchema, bytes);
      const r = res.messageResponse;
      if (r.case === "errorResponse") {
        assert.equal(r.value.errorCode, status.NOT_FOUND);
        assert.ok(r.value.errorMessage.length < 200, `an error of ${r.value.errorMessage.length} characters`);
      }
      tally.add(rpc, r.case === "errorResponse" ? "answer NOT_FOUND" : `answer ${r.case}`);
    }
  }
}

/**
 * A role's control RPCs (empty requests): `perRpc` messages each, 70% that do not parse (refused
 * INVALID_ARGUMENT naming the field) and 30% made only of fields the contract does not know (ignored:
 * OK). An RPC that `acts` on any request that parses (Drain, Stop, Checkpoint) gets only the former.
 */
export async function fuzzControl(
  raw: RawClient,
  service: DescService,
  method: string,
  acts: boolean,
  perRpc: number,
  rng: Rng,
  tally: Tally,
): Promise<void> {
  const rpc = `${service.name}/${method}`;
  const schema = service.methods.find((m) => m.name === method)!.input;
  const share = acts ? perRpc : (perRpc * 7) / 10;
  await inParallel(malformed(schema, {}, share, rng), 16, async (m) => {
    const answer = await raw.unary(pathOf(service, method), m.bytes);
    assertMalformedAnswer(answer, m, rpc);
    tally.add(rpc, answer.code);
  });
  await inParallel(unknownFields(perRpc - share, rng), 16, async (bytes) => {
    const answer = await raw.unary(pathOf(service, method), bytes);
    assert.equal(answer.code, status.OK, `${rpc}: fields this contract does not know are ignored: ${answer.details}`);
    tally.add(rpc, answer.code);
  });
}
