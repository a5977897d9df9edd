"""The decode roofline: what one step must move and compute, the device's limits, and the predictions they imply.

Following shared/PERFORMANCE.md, one decode step for B active slots reads every weight once and each slot's KV cache
once, and does 2 * n_params FLOPs per slot:

    memory time  = (weight_bytes + B * kv_bytes_per_token * context) / bandwidth
    compute time = 2 * n_params * B / peak_flops
    step time   >= max(memory time, compute time)

The critical batch, where decode turns compute bound (KV reads left out), is peak_flops / bandwidth * bytes_per_param
/ 2. Limits come from a named preset (published HBM bandwidth and dense bf16 peak) or are measured on this device in
the engine's dtype: a large-array read for bandwidth, a large square matmul for FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Limits of one chip."""

    name: str
    """Human-readable name."""
    bandwidth: float
    """Memory bandwidth, bytes/s."""
    peak_flops: float
    """Matmul peak in the dtype the model runs in, FLOP/s."""
    memory_bytes: float | None = None
    """Device memory, bytes (None: unknown)."""
    source: str = "measured"
    """Where the figures come from ("measured", or the published spec they were read from)."""


# Published per-chip figures: HBM bandwidth and dense (no sparsity) bf16 matmul peak.
PRESETS: dict[str, DeviceSpec] = {
    "tpu_v5e": DeviceSpec("TPU v5e", 819e9, 197e12, 16 * 2**30, "Google Cloud TPU v5e spec"),
    "tpu_v6e": DeviceSpec("TPU v6e", 1640e9, 918e12, 32 * 2**30, "Google Cloud TPU v6e (Trillium) spec"),
    "h100": DeviceSpec("NVIDIA H100 SXM", 3.35e12, 989e12, 80e9, "NVIDIA H100 SXM datasheet"),
    "h200": DeviceSpec("NVIDIA H200 SXM", 4.8e12, 989e12, 141e9, "NVIDIA H200 SXM datasheet"),
}


def preset(name: str) -> DeviceSpec:
    """The named preset; ValueError lists the known names."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown device spec {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None


def _best_seconds(fn, repeats: int) -> float:
    fn()  # compile and touch the pages outside the timed runs
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(dtype: str = "float32", megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s one device reads a `megabytes` array of `dtype` at (best of `repeats` full reductions)."""
    dt = jnp.dtype(dtype)
    x = jnp.ones((megabytes * 2**20 // dt.itemsize,), dt)
    # Accumulating in f32 keeps the reduction a pure read on every backend, whatever the array's dtype.
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    seconds = _best_seconds(lambda: total(x).block_until_ready(), repeats)
    return x.nbytes / seconds


def measure_matmul_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5, chain: int = 4) -> float:
    """FLOP/s of `chain` dependent n x n matmuls in `dtype` (best of `repeats`); chaining hides dispatch overhead."""
    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dt) / math.sqrt(n)

    def many(x):
        for _ in range(chain):
            x = x @ a
        return x

    fn = jax.jit(many)
    seconds = _best_seconds(lambda: fn(a).block_until_ready(), repeats)
    return 2 * n**3 * chain / seconds


def measure_device(dtype: str, *, megabytes: int = 512, matmul_n: int = 2048, repeats: int = 5) -> DeviceSpec:
    """This device's limits in `dtype`, measured now (the machine is shared: quote ratios taken in the same run)."""
    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return DeviceSpec(
        name=f"{device.platform}:{device.device_kind}",
        bandwidth=measure_bandwidth(dtype, megabytes, repeats),
        peak_flops=measure_matmul_flops(dtype, matmul_n, repeats),
        memory_bytes=float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None,
        source="measured",
    )


@dataclasses.dataclass(frozen=True)
class Roofline:
    """A model on a device (or `chips` of them, sharded): the decode limits of shared/PERFORMANCE.md."""

    n_params: int
    """Parameters (tied embeddings counted once)."""
    weight_bytes: int
    """Bytes of weights one decode step reads."""
    kv_bytes_per_token: int
    """Bytes of K and V one cached token holds across all layers."""
    device: DeviceSpec
    """Limits of one chip."""
    chips: int = 1
    """Chips the model and cache are sharded over; bandwidth and FLOP/s add up."""

    @property
    def bandwidth(self) -> float:
        return self.device.bandwidth * self.chips

    @property
    def peak_flops(self) -> float:
        return self.device.peak_flops * self.chips

    @property
    def bytes_per_param(self) -> float:
        return self.weight_bytes / self.n_params

    @property
    def critical_batch(self) -> float:
        """Slots above which decode is compute bound, KV reads left out: peak / bandwidth * bytes_per_param / 2."""
        return self.peak_flops / self.bandwidth * self.bytes_per_param / 2

    def critical_batch_at(self, context: int) -> float:
        """Slots where memory and compute time meet once each slot also reads `context` tokens of KV; inf when the
        KV reads grow faster than the FLOPs (decode then never turns compute bound)."""
        per_slot_compute = 2 * self.n_params / self.peak_flops
        per_slot_memory = self.kv_bytes_per_token * context / self.bandwidth
        if per_slot_compute <= per_slot_memory:
            return math.inf
        return self.weight_bytes / self.bandwidth / (per_slot_compute - per_slot_memory)

    def memory_seconds(self, slots: int, context: int) -> float:
        """Lower bound on one step from bytes: weights + slots x context tokens of KV."""
        return (self.weight_bytes + slots * context * self.kv_bytes_per_token) / self.bandwidth

    def compute_seconds(self, slots: int) -> float:
        """Lower bound on one step from FLOPs: 2 * n_params per slot."""
        return 2 * self.n_params * slots / self.peak_flops

    def step_seconds(self, slots: int, context: int) -> float:
        """Predicted decode step time: the larger of the two bounds."""
        return max(self.memory_seconds(slots, context), self.compute_seconds(slots))

    def tokens_per_second(self, slots: int, context: int) -> float:
        """Predicted decode throughput: one token per slot per step."""
        return slots / self.step_seconds(slots, context)

    def kv_pages(self, page_size: int, memory_fraction: float = 0.85) -> int | None:
        """KV pages of `page_size` positions that fit beside the weights (the engine's pool, as `--kv_pages` would be
        sized from `--kv_memory_fraction`); None when memory is unknown."""
        if self.device.memory_bytes is None:
            return None
        free = self.device.memory_bytes * self.chips * memory_fraction - self.weight_bytes
        return max(int(free // (self.kv_bytes_per_token * page_size)), 0)

    def sequences_held(self, tokens: int, page_size: int, memory_fraction: float = 0.85) -> int | None:
        """Sequences of `tokens` tokens (prompt + output) the KV pool holds at once: pages / pages per sequence. With
        a shared pool this, not max_seq_len, decides how many conversations fit; None when memory is unknown."""
        pages = self.kv_pages(page_size, memory_fraction)
        return None if pages is None else pages // -(-tokens // page_size)

    def max_slots(self, max_seq_len: int, memory_fraction: float = 0.85, page_size: int = 64) -> int | None:
        """Most slots that could each hold `max_seq_len` tokens at once; None when memory is unknown."""
        return self.sequences_held(max_seq_len, page_size, memory_fraction)

    def table(self, slot_counts: Sequence[int], contexts: Sequence[int]) -> list[dict[str, float | int | str]]:
        """One row per (slots, context): the predicted step time, tokens/s and which bound sets it."""
        rows = []
        for context in contexts:
            for slots in slot_counts:
                memory, compute = self.memory_seconds(slots, context), self.compute_seconds(slots)
                rows.append(
                    {
                        "slots": slots,
                        "context": context,
                        "step_ms": max(memory, compute) * 1e3,
                        "tokens_per_s": slots / max(memory, compute),
                        "bound": "memory" if memory >= compute else "compute",
                        "intensity_flop_per_byte": 2
                        * self.n_params
                        * slots
                        / (self.weight_bytes + slots * context * self.kv_bytes_per_token),
                    }
                )
        return rows

    def summary(self) -> dict[str, float | int | str | None]:
        """The figures every roofline report starts with."""
        return {
            "device": self.device.name,
            "device_source": self.device.source,
            "chips": self.chips,
            "bandwidth_gb_s": self.bandwidth / 1e9,
            "peak_tflop_s": self.peak_flops / 1e12,
            "n_params": self.n_params,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "critical_batch": self.critical_batch,
        }


def mbu(weight_bytes: float, slots: int, kv_bytes_read_per_slot: float, step_seconds: float, bandwidth: float) -> float:
    """Model bandwidth utilization of one decode step: (weights + slots x KV read) / step time / bandwidth."""
    return (weight_bytes + slots * kv_bytes_read_per_slot) / step_seconds / bandwidth


def mfu(n_params: int, tokens_per_second: float, peak_flops: float) -> float:
    """Model FLOP utilization: 2 * n_params * tokens/s / peak FLOP/s."""
    return 2 * n_params * tokens_per_second / peak_flops
