import { z } from "zod";

/**
 * Limits a buggy or hostile client cannot exceed, enforced by every gRPC server and client (a key
 * of `transport`). What each costs when reached is in the README's "Reliability" section.
 */
export const LimitsSection = z
  .object({
    maxConcurrentStreams: z
      .number()
      .int()
      .positive()
      .default(100)
      .describe("Calls one HTTP/2 connection may hold open at once (grpc.max_concurrent_streams); a client's further calls wait."),
    producers: z
      .number()
      .int()
      .positive()
      .default(64)
      .describe("Producers per run at the buffer: Push streams open at once and distinct producer ids; past it RESOURCE_EXHAUSTED."),
    trainers: z
      .number()
      .int()
      .positive()
      .default(256)
      .describe("Trainers per run at the buffer: Batches streams open at once; past it RESOURCE_EXHAUSTED."),
    idleStreamMs: z
      .number()
      .int()
      .positive()
      .default(600_000)
      .describe(
        "A stream whose peer neither sends nor reads for this long is ended with UNAVAILABLE; producers and trainers reopen theirs.",
      ),
    callDeadlineMs: z
      .number()
      .int()
      .positive()
      .default(60_000)
      .describe("Deadline of a unary call whose caller sets none, so no control call waits forever on a stuck server."),
  })
  .strict();
