import {
  create,
  createFileRegistry,
  type DescMethod,
  type DescService,
  type FileRegistry,
  fromBinary,
  fromJson,
  type JsonValue,
  toBinary,
  toJson,
} from "@bufbuild/protobuf";
import { type FileDescriptorProto, FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { Client, credentials, Metadata } from "@grpc/grpc-js";
import {
  ServerReflection,
  type ServerReflectionRequest,
  ServerReflectionRequestSchema,
} from "../../services/gen/grpc/reflection/v1/reflection_pb.js";
import type { ServerReflectionResponse } from "../../services/gen/grpc/reflection/v1/reflection_pb.js";
import { createClient, type ServiceClient } from "../../services/common/grpc/adapter.js";
import { RunConfigSchema } from "../../services/common/config/index.js";

/**
 * What grpcurl does with server reflection, without the binary: `list` asks for service names,
 * `describe` fetches the file descriptors holding a symbol (and their imports), `call` turns JSON
 * into the request message with those descriptors, sends it, and turns the answer back into JSON.
 */
export class ReflectionClient {
  private readonly reflection: ServiceClient<typeof ServerReflection>;
  private readonly raw: Client;
  private readonly files = new Map<string, FileDescriptorProto>();

  constructor(readonly address: string) {
    const transport = RunConfigSchema.parse({}).transport;
    this.reflection = createClient(ServerReflection, address, transport);
    this.raw = new Client(address, credentials.createInsecure());
  }

  private ask(messageRequest: ServerReflectionRequest["messageRequest"]): Promise<ServerReflectionResponse> {
    return new Promise((resolve, reject) => {
      const call = this.reflection.serverReflectionInfo();
      call.once("data", (res: ServerReflectionResponse) => {
        call.end();
        if (res.messageResponse.case === "errorResponse") reject(new Error(res.messageResponse.value.errorMessage));
        else resolve(res);
      });
      call.once("error", reject);
      call.write(create(ServerReflectionRequestSchema, { messageRequest }));
    });
  }

  /** `grpcurl ADDR list` */
  async list(): Promise<string[]> {
    const res = await this.ask({ case: "listServices", value: "" });
    if (res.messageResponse.case !== "listServicesResponse") throw new Error("unexpected reflection answer");
    return res.messageResponse.value.service.map((s) => s.name).sort();
  }

  private async load(request: ServerReflectionRequest["messageRequest"]): Promise<void> {
    const res = await this.ask(request);
    if (res.messageResponse.case !== "fileDescriptorResponse") throw new Error("unexpected reflection answer");
    for (const bytes of res.messageResponse.value.fileDescriptorProto) {
      const file = fromBinary(FileDescriptorProtoSchema, bytes);
      this.files.set(file.name, file);
    }
    for (const file of [...this.files.values()]) {
      for (const dep of file.dependency) if (!this.files.has(dep)) await this.load({ case: "fileByFilename", value: dep });
    }
  }

  /** The registry of every file needed for `symbol` (a service or message full name). */
  async registry(symbol: string): Promise<FileRegistry> {
    await this.load({ case: "fileContainingSymbol", value: symbol });
    const ordered: FileDescriptorProto[] = [];
    const visit = (file: FileDescriptorProto) => {
      if (ordered.includes(file)) return;
      for (const dep of file.dependency) visit(this.files.get(dep)!);
      ordered.push(file);
    };
    for (const file of this.files.values()) visit(file);
    return createFileRegistry(create(FileDescriptorSetSchema, { file: ordered }));
  }

  /** `grpcurl ADDR describe SERVICE` */
  async describe(service: string): Promise<DescService> {
    const desc = (await this.registry(service)).getService(service);
    if (!desc) throw new Error(`service ${service} not found`);
    return desc;
  }

  /** The descriptor as sent, with comments when the server kept source info. */
  fileOf(name: string): FileDescriptorProto | undefined {
    return this.files.get(name);
  }

  /** `grpcurl -d JSON ADDR SERVICE/METHOD` for a unary method. */
  async call(service: string, method: string, json: JsonValue): Promise<JsonValue> {
    const desc = await this.describe(service);
    const m: DescMethod | undefined = desc.methods.find((x) => x.name === method);
    if (!m) throw new Error(`method ${service}/${method} not found`);
    const registry = await this.registry(service);
    const request = fromJson(m.input, json, { registry });
    return new Promise((resolve, reject) => {
      this.raw.makeUnaryRequest(
        `/${service}/${method}`,
        (r: typeof request) => Buffer.from(toBinary(m.input, r)),
        (b: Buffer) => fromBinary(m.output, b),
        request,
        new Metadata(),
        {},
        (err, res) => (err || !res ? reject(err) : resolve(toJson(m.output, res, { registry }))),
      );
    });
  }

  close(): void {
    this.reflection.close();
    this.raw.close();
  }
}
