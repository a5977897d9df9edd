"""meshserve.v1: the MeshServe gRPC service (`meshserve_pb2`, `meshserve_pb2_grpc`), generated from meshserve.proto."""

TRANSPORT_BYTES_FACTOR = 16
"""A MeshServe server's gRPC receive limit as a multiple of its `Limits.max_request_bytes`. A request above
max_request_bytes must reach the servicer to be told INVALID_ARGUMENT naming the limit: gRPC's own refusal of an
oversized message is a bare RESOURCE_EXHAUSTED, which clients read as "queue full, retry later" and retry forever.
Shared by the engine's server (service/server.py) and the gateway's gRPC front (gateway/grpc_front.py)."""

DRAINING_KEY = "meshserve-draining"
"""Trailing metadata ("1") on a Generate refused or ended with UNAVAILABLE because the server is draining for
shutdown: a router reads it as "no new work here", never as a failure of the replica (two plain UNAVAILABLEs would
eject it and cut the streams it is finishing). Set by service/server.py, read by gateway/backend.py."""
