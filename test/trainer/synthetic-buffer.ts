import { create } from "@bufbuild/protobuf";
import { status } from "@grpc/grpc-js";
import type { RunConfig } from "../../services/common/config/index.js";
import { FieldError } from "../../services/common/errors.js";
import { Serving } from "../../services/common/grpc/health.js";
import { bind, type RunningServer, startServer } from "../../services/common/grpc/server.js";
import { encodeFloats, toTensor } from "../../services/common/tensor-codec.js";
import { BatchesResponseSchema, BufferService } from "../../services/gen/saeflow/buffer/v1/buffer_pb.js";
import { ServiceState } from "../../services/gen/saeflow/v1/control_pb.js";
import type { DType } from "../../services/gen/saeflow/v1/tensor_pb.js";

/** One pool the synthetic buffer serves: its rows, cycled through forever. */
export interface SyntheticPool {
  hookPoint: string;
  dModel: number;
  rows: Float32Array;
}

/**
 * A real gRPC BufferService on loopback that serves synthetic rows: Status lists its pools (one,
 * or `pools`), Batches cycles through a pool's rows in the requested batch size, forever, held back
 * by flow control and ended by the trainer's cancel. `address` binds a given port (a shard started
 * again where it was).
 */
export async function startSyntheticBuffer(
  opts: { config: RunConfig; dtype: DType; address?: string } & (SyntheticPool | { pools: SyntheticPool[] }),
): Promise<RunningServer> {
  const pools = "pools" in opts ? opts.pools : [{ hookPoint: opts.hookPoint, dModel: opts.dModel, rows: opts.rows }];
  const unimplemented = (): never => {
    throw new FieldError("method", "not served by the synthetic buffer", status.UNIMPLEMENTED);
  };
  const server = await startServer(opts.address ?? "127.0.0.1:0", opts.config.transport, [
    bind(BufferService, {
      push: unimplemented,
      status: async () => ({
        state: ServiceState.RUNNING,
        runId: opts.config.run.id,
        hookPoints: pools.map(({ hookPoint, dModel, rows }) => {
          const total = BigInt(rows.length / dModel);
          return { hookPoint, dModel, capacityRows: total, unconsumedRows: total };
        }),
      }),
      batches: async function* (req, ctx) {
        const pool = pools.find((p) => p.hookPoint === req.hookPoint);
        if (!pool) throw new FieldError("hook_point", `no pool "${req.hookPoint}"`, status.NOT_FOUND);
        const { dModel, rows } = pool;
        const total = rows.length / dModel;
        let at = 0;
        for (let seq = 0n; !ctx.signal.aborted; seq++) {
          const batch = new Float32Array(req.batchSize * dModel);
          for (let r = 0; r < req.batchSize; r++, at = (at + 1) % total)
            batch.set(rows.subarray(at * dModel, (at + 1) * dModel), r * dModel);
          yield create(BatchesResponseSchema, {
            activations: toTensor(encodeFloats(batch, opts.dtype), opts.dtype, [req.batchSize, dModel]),
            sequence: seq,
          });
        }
      },
      pause: unimplemented,
      resume: unimplemented,
      drain: unimplemented,
    }),
  ]);
  server.health.set(Serving.SERVING);
  return server;
}
