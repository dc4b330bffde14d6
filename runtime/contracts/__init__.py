"""The runtime's contracts: what every other room agrees on, importing nothing heavy.

`settings` (the denoising settings, defined once), `jobs` (job spec, record, events and the one
serializer for Redis), `keys` (every Redis key name) and `errors` (the runtime's errors and their gRPC
status codes). The gateway, the SDK, the queue and the workers all speak these types.
"""
