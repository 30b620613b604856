/**
 * Environment every role process runs with, wherever it is launched (saeflow up, the benches; the
 * image sets the same in deploy/docker/Dockerfile, and test/deploy/image.test.ts checks they agree).
 *
 * glibc serves allocations above its mmap threshold (32 MiB at most by default, and adjusted on the
 * fly) with fresh pages, and trims freed memory back to the kernel: every gRPC message of a few MiB
 * then costs its size in page faults on the copies grpc-js makes to frame and reassemble it. Keeping
 * large blocks in the heap and not trimming it took a Batches stream of 8 MiB messages from about
 * 0.9 to 1.6 GB/s and of 32 MiB ones from 0.65 to 1.15 GB/s on a 2-core machine. The cost is that a
 * process keeps its peak heap; a role's peak is its pool and a few messages, which it keeps anyway.
 */
export const ROLE_ENV: Readonly<Record<string, string>> = {
  MALLOC_MMAP_THRESHOLD_: "4294967296",
  MALLOC_TRIM_THRESHOLD_: "4294967296",
  // onnxruntime-node 1.30 otherwise starts a telemetry uploader on its first session.
  ORT_DISABLE_TELEMETRY: "1",
};

/** `env` with ROLE_ENV laid over it. */
export const roleEnv = (env: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv => ({ ...env, ...ROLE_ENV });
