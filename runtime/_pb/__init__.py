"""Generated gRPC modules for proto/blockpress/v1/runtime.proto; regenerate with `make proto`."""
