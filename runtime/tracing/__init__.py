"""Tracing: OpenTelemetry setup and span names (`telemetry`), the Redis trace store (`store`), and the
views a latency tuner reads (`view`, `stats`)."""
