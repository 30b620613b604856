import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { type DescriptorProto, type FileDescriptorProto, FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import type { Server } from "@grpc/grpc-js";
import * as v1 from "../../gen/grpc/reflection/v1/reflection_pb.js";
import * as v1alpha from "../../gen/grpc/reflection/v1alpha/reflection_pb.js";
import { type ServerLimits, serviceDefinition, serviceImplementation } from "./adapter.js";
import type { CallGuard } from "./authorize.js";
import { quoted } from "./limits.js";

/**
 * Server reflection, v1 and v1alpha, answering from the descriptor set `npm run gen` writes with
 * buf. Those descriptors keep the .proto comments (so `grpcurl describe` shows the contract's
 * documentation) and fully qualified type names (which strict clients such as protobuf-es need).
 */
const descriptorSetPath = fileURLToPath(new URL("../../gen/saeflow.binpb", import.meta.url));

interface Index {
  /** File name → serialised FileDescriptorProto. */
  bytes: Map<string, Uint8Array>;
  files: Map<string, FileDescriptorProto>;
  /** Fully qualified symbol (message, enum, service, method) → file name. */
  symbols: Map<string, string>;
}

let cached: Index | undefined;

function index(): Index {
  if (cached) return cached;
  const set = fromBinary(FileDescriptorSetSchema, readFileSync(descriptorSetPath));
  const idx: Index = { bytes: new Map(), files: new Map(), symbols: new Map() };
  for (const file of set.file) {
    idx.files.set(file.name, file);
    idx.bytes.set(file.name, toBinary(FileDescriptorProtoSchema, file));
    const prefix = file.package ? `${file.package}.` : "";
    const addMessages = (scope: string, messages: DescriptorProto[]) => {
      for (const m of messages) {
        idx.symbols.set(`${scope}${m.name}`, file.name);
        for (const e of m.enumType) idx.symbols.set(`${scope}${m.name}.${e.name}`, file.name);
        addMessages(`${scope}${m.name}.`, m.nestedType);
      }
    };
    addMessages(prefix, file.messageType);
    for (const e of file.enumType) idx.symbols.set(`${prefix}${e.name}`, file.name);
    for (const s of file.service) {
      idx.symbols.set(`${prefix}${s.name}`, file.name);
      for (const m of s.method) idx.symbols.set(`${prefix}${s.name}.${m.name}`, file.name);
    }
  }
  cached = idx;
  return idx;
}

/** The file and everything it imports, the file first. */
function withDependencies(idx: Index, name: string): Uint8Array[] {
  const order: string[] = [];
  const visit = (n: string) => {
    if (order.includes(n) || !idx.files.has(n)) return;
    order.push(n);
    for (const dep of idx.files.get(n)!.dependency) visit(dep);
  };
  visit(name);
  return order.map((n) => idx.bytes.get(n)!);
}

type Request = v1.ServerReflectionRequest | v1alpha.ServerReflectionRequest;
const NOT_FOUND = 5;

function answer(services: string[], req: Request) {
  const idx = index();
  const error = (errorMessage: string) => ({ case: "errorResponse" as const, value: { errorCode: NOT_FOUND, errorMessage } });
  const files = (name: string | undefined, what: string) =>
    name
      ? { case: "fileDescriptorResponse" as const, value: { fileDescriptorProto: withDependencies(idx, name) } }
      : error(`${what} not found`);
  const r = req.messageRequest;
  switch (r.case) {
    case "listServices":
      return { case: "listServicesResponse" as const, value: { service: services.map((name) => ({ name })) } };
    case "fileByFilename":
      return files(idx.files.has(r.value) ? r.value : undefined, `file ${quoted(r.value)}`);
    case "fileContainingSymbol":
      return files(idx.symbols.get(r.value.replace(/^\./, "")), `symbol ${quoted(r.value)}`);
    case "fileContainingExtension":
      return error(`extension ${quoted(r.value.containingType)}/${r.value.extensionNumber} not found`);
    case "allExtensionNumbersOfType":
      return { case: "allExtensionNumbersResponse" as const, value: { baseTypeName: r.value, extensionNumber: [] } };
    default:
      return error("empty request");
  }
}

/** Adds both reflection versions to `server`, listing `services` plus reflection itself; `guard` as for every service. */
export function addReflection(server: Server, services: string[], guard?: CallGuard, limits?: ServerLimits): void {
  const listed = [...new Set([...services, v1.ServerReflection.typeName, v1alpha.ServerReflection.typeName])].sort();
  // v1alpha is v1 under another package name: the same answers, built with each version's schema.
  server.addService(
    serviceDefinition(v1.ServerReflection),
    serviceImplementation(
      v1.ServerReflection,
      {
        serverReflectionInfo: async function* (requests) {
          for await (const req of requests) {
            yield create(v1.ServerReflectionResponseSchema, {
              validHost: req.host,
              originalRequest: req,
              messageResponse: answer(listed, req),
            });
          }
        },
      },
      guard,
      limits,
    ),
  );
  server.addService(
    serviceDefinition(v1alpha.ServerReflection),
    serviceImplementation(
      v1alpha.ServerReflection,
      {
        serverReflectionInfo: async function* (requests) {
          for await (const req of requests) {
            yield create(v1alpha.ServerReflectionResponseSchema, {
              validHost: req.host,
              originalRequest: req,
              messageResponse: answer(listed, req),
            });
          }
        },
      },
      guard,
      limits,
    ),
  );
}
