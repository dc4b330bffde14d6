"""BlockPress runtime: gateway, queue, jobs, config, telemetry, client SDK and CLI."""
