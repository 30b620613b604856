import type { ServiceError } from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";
import type { Metadata } from "@grpc/grpc-js";
import type { IncomingHttpHeaders, Http2SecureServer, Http2Server } from "node:http2";

/**
 * No saeflow client compresses (tensors do not compress), but grpc-js inflates gzip and deflate
 * requests up to transport.maxMessageBytes before anything can look at them: 250 KiB of gzip become
 * 250 MiB on the heap, per stream. So a request's grpc-encoding is set to identity before grpc-js
 * sees it (nothing is ever inflated), the encoding asked for is kept under REFUSED_ENCODING, and the
 * adapter refuses such a call before its handler runs.
 */
const REFUSED_ENCODING = "saeflow-refused-encoding";

/** Makes every stream of `http2` identity-encoded before grpc-js's own listener runs. */
export function refuseCompression(http2: Http2Server | Http2SecureServer): void {
  http2.prependListener("stream", (_stream: unknown, headers: IncomingHttpHeaders) => {
    const encoding = headers["grpc-encoding"];
    if (encoding !== undefined && encoding !== "identity") {
      headers["grpc-encoding"] = "identity";
      headers[REFUSED_ENCODING] = String(encoding).slice(0, 64);
    } else {
      delete headers[REFUSED_ENCODING];
    }
  });
}

/** The refusal of a call that asked for a compressed request, or undefined. */
export function compressionRefusal(metadata: Metadata): Partial<ServiceError> | undefined {
  const encoding = metadata.get(REFUSED_ENCODING)[0];
  if (encoding === undefined) return undefined;
  return {
    code: status.UNIMPLEMENTED,
    details: `grpc-encoding: "${String(encoding)}" is refused; saeflow servers take uncompressed messages only (a compressed one may inflate to transport.maxMessageBytes)`,
  };
}
