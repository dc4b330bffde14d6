"""The Python SDK: `AsyncClient` (`aio.py`) over the gateway's gRPC API, and `Client` (`sync.py`) over it."""
