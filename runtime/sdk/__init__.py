"""The Python SDK: `AsyncClient` and `Client` over the gateway's gRPC API."""
