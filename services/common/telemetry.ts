import { metrics, trace, type Span, SpanStatusCode, type Tracer } from "@opentelemetry/api";
import { W3CTraceContextPropagator } from "@opentelemetry/core";
import { OTLPMetricExporter } from "@opentelemetry/exporter-metrics-otlp-http";
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { MeterProvider, PeriodicExportingMetricReader } from "@opentelemetry/sdk-metrics";
import { BatchSpanProcessor, NodeTracerProvider } from "@opentelemetry/sdk-trace-node";

/**
 * The one telemetry setup. Roles write spans and metrics through @opentelemetry/api; this installs
 * the SDK once per process: W3C trace context propagation always (so a trace crosses gRPC and NATS
 * whether or not this process exports), and OTLP/HTTP export to `endpoint` (Jaeger all-in-one
 * listens on :4318) when one is configured.
 */
export interface Telemetry {
  /** Flushes pending spans and metrics and stops exporting. */
  shutdown(): Promise<void>;
}

export interface TelemetryOptions {
  serviceName: string;
  /** Base URL such as http://127.0.0.1:4318; empty exports nothing. */
  endpoint: string;
  metricsIntervalMs: number;
  /** Extra resource attributes, e.g. run id and producer id. */
  attributes?: Record<string, string>;
}

export function startTelemetry(options: TelemetryOptions): Telemetry {
  const resource = resourceFromAttributes({ "service.name": options.serviceName, ...options.attributes });
  const base = options.endpoint.replace(/\/+$/, "");
  // Registered even without an endpoint: spans then get real ids and the context manager carries
  // them across awaits, so trace context still flows to peers that do export.
  const tracerProvider = new NodeTracerProvider({
    resource,
    spanProcessors: base
      ? [new BatchSpanProcessor(new OTLPTraceExporter({ url: `${base}/v1/traces` }), { scheduledDelayMillis: 500 })]
      : [],
  });
  tracerProvider.register({ propagator: new W3CTraceContextPropagator() });
  if (!base) return { shutdown: () => tracerProvider.shutdown() };
  const meterProvider = new MeterProvider({
    resource,
    readers: [
      new PeriodicExportingMetricReader({
        exporter: new OTLPMetricExporter({ url: `${base}/v1/metrics` }),
        exportIntervalMillis: options.metricsIntervalMs,
      }),
    ],
  });
  metrics.setGlobalMeterProvider(meterProvider);
  return {
    shutdown: async () => {
      await Promise.allSettled([tracerProvider.shutdown(), meterProvider.shutdown()]);
    },
  };
}

/** Runs `fn` inside a span that records an exception and error status if `fn` throws. */
export async function inSpan<T>(
  tracer: Tracer,
  name: string,
  attributes: Record<string, string | number | boolean>,
  fn: (span: Span) => Promise<T>,
): Promise<T> {
  return tracer.startActiveSpan(name, { attributes }, async (span) => {
    try {
      return await fn(span);
    } catch (err) {
      span.recordException(err as Error);
      span.setStatus({ code: SpanStatusCode.ERROR, message: (err as Error).message });
      throw err;
    } finally {
      span.end();
    }
  });
}

/** The W3C traceparent of a span, to carry in a message (chunks, batches) for span links. */
export function traceparentOf(span: Span): string {
  const c = span.spanContext();
  if (!trace.isSpanContextValid(c)) return "";
  return `00-${c.traceId}-${c.spanId}-0${c.traceFlags.toString(16)}`;
}

/** Parses a traceparent carried in a message into a span context for a link; undefined if absent. */
export function linkFrom(
  traceparent: string,
): { context: { traceId: string; spanId: string; traceFlags: number; isRemote: boolean } } | undefined {
  const m = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/.exec(traceparent);
  if (!m) return undefined;
  return { context: { traceId: m[1]!, spanId: m[2]!, traceFlags: parseInt(m[3]!, 16), isRemote: true } };
}
