"""The fleet: a router over many meshserve replicas in several regions, living in the gateway process.

`policy` and `admission` are pure (no I/O, no clock: time is an argument), shared by the router (`router`) and the
fleet simulator, so what the simulator measures is the code that routes.
"""
