"""meshserve.v1: the MeshServe gRPC service (`meshserve_pb2`, `meshserve_pb2_grpc`), generated from meshserve.proto."""
