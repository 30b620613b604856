import type { ServiceHandlers } from "../common/grpc/adapter.js";
import { ProducerService, type StatusResponse } from "../gen/saeflow/producer/v1/producer_pb.js";
import type { ServiceState } from "../gen/saeflow/v1/control_pb.js";

/** What the control RPCs act on. */
export interface ProducerControl {
  status(): StatusResponse;
  /** Closes the production gate; the chunk in flight still goes out. Returns the state after. */
  pause(): ServiceState;
  resume(): ServiceState;
}

/** ProducerService for grpcurl: Status, Pause, Resume. */
export function producerHandlers(control: ProducerControl): ServiceHandlers<typeof ProducerService> {
  return {
    status: async () => control.status(),
    pause: async () => ({ state: control.pause() }),
    resume: async () => ({ state: control.resume() }),
  };
}
