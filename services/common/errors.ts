import { status } from "@grpc/grpc-js";

/**
 * An error a peer caused, carrying the gRPC status to answer with and the field at fault. The gRPC
 * adapter turns it into that status; anything else thrown by a handler becomes INTERNAL. `message`
 * reads `field: rawMessage`, so callers that re-home the error under another key take `rawMessage`.
 */
export class FieldError extends Error {
  readonly rawMessage: string;

  constructor(
    readonly field: string,
    rawMessage: string,
    readonly code: status = status.INVALID_ARGUMENT,
  ) {
    super(`${field}: ${rawMessage}`);
    this.name = "FieldError";
    this.rawMessage = rawMessage;
  }
}
