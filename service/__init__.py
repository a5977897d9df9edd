"""The gRPC front door: the MeshServe servicer, the engine thread that drives the scheduler, health, metrics, drain.

This room talks to the engine only through `engine.scheduler.Scheduler` (submit / cancel / step / stats) and a few
read-only facts of the engine (its config, model config, mesh and memory budget); it knows nothing of einsums.
"""
