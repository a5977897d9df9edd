"""Benchmarks for meshserve: the roofline, W1 latency, W2 offline throughput, W3 online serving and slot sweeps.

`scripts/benchmark.py` maps its flags onto `bench.runner`; the modules here hold the arithmetic (`roofline`, `stats`),
the prompt sets (`workloads`), the HF transformers baseline (`hf_baseline`), the gRPC load generator (`serve_client`)
and the plots (`plots`), each importable and testable without the command line. Workload names and formulas follow
shared/PERFORMANCE.md.
"""
