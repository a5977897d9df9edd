"""The inference engine: model, KV cache, sampling and the continuous-batching scheduler.

This room knows nothing of gRPC or of the mesh's construction; it receives a mesh and sharding rules and runs
prefill / insert / generate over them.
"""
