import type { ChannelOptions } from "@grpc/grpc-js";
import type { TransportConfig } from "../config/index.js";

/**
 * How long either end waits for its keepalive ping to be answered before it closes the connection.
 * A process whose thread is held that long (a long forward pass on it) cannot answer in time.
 */
export const keepaliveTimeoutMs = (t: TransportConfig): number => Math.max(5000, Math.floor(t.keepaliveMs / 2));

/**
 * A channel's wait after a failed connect: the first, and the longest it grows to. A stream's own
 * retry loop waits no longer than the longest between its tries, so a buffer back from a restart is
 * found within about half a second whatever the outage's length.
 */
export const RECONNECT_INITIAL_MS = 100;
export const RECONNECT_MAX_MS = 500;

/**
 * Channel and server options every service uses. grpc-js caps messages at 4 MiB and keeps HTTP/2
 * windows at 64 KiB by default, which holds a tensor stream to ~0.3 GB/s; the windows come from
 * the transport config.
 */
export function channelOptions(t: TransportConfig): ChannelOptions {
  return {
    "grpc.max_receive_message_length": t.maxMessageBytes,
    "grpc.max_send_message_length": t.maxMessageBytes,
    "grpc-node.flow_control_window": t.flowControlWindowBytes,
    "grpc.keepalive_time_ms": t.keepaliveMs,
    "grpc.keepalive_timeout_ms": keepaliveTimeoutMs(t),
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.max_pings_without_data": 0,
    // Each client its own HTTP/2 connection: on one shared by a Push held back by a full pool and the
    // Batches that would free it, both stopped (test/buffer/one-connection.test.ts).
    "grpc.use_local_subchannel_pool": 1,
    // grpc-js waits 1 s after a failed connect, 1.6x longer each time, up to 120 s: a buffer back
    // after a restart was found ~1.3 s late, and after a minute's outage could be half a minute late.
    "grpc.initial_reconnect_backoff_ms": RECONNECT_INITIAL_MS,
    "grpc.max_reconnect_backoff_ms": RECONNECT_MAX_MS,
    ...(t.tls.mode !== "off" && t.tls.serverName ? { "grpc.ssl_target_name_override": t.tls.serverName } : {}),
  };
}

export function serverOptions(t: TransportConfig): ChannelOptions {
  return {
    "grpc.max_receive_message_length": t.maxMessageBytes,
    "grpc.max_send_message_length": t.maxMessageBytes,
    "grpc.keepalive_time_ms": t.keepaliveMs,
    "grpc.keepalive_timeout_ms": keepaliveTimeoutMs(t),
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.http2.min_ping_interval_without_data_ms": 1000,
    // A client's calls past this wait for one of its streams to end (HTTP/2 SETTINGS), never pile up here.
    "grpc.max_concurrent_streams": t.limits.maxConcurrentStreams,
  };
}
