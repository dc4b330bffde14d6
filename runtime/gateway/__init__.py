"""The gRPC gateway: validation at the edge, admission, queueing, and streams of a job's events."""
