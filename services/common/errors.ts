import { status } from "@grpc/grpc-js";

/**
 * An error a peer caused, carrying the gRPC status to answer with and the field at fault. The gRPC
 * adapter turns it into that status; anything else thrown by a handler becomes INTERNAL.
 */
export class FieldError extends Error {
  constructor(
    readonly field: string,
    message: string,
    readonly code: status = status.INVALID_ARGUMENT,
  ) {
    super(`${field}: ${message}`);
    this.name = "FieldError";
  }
}
