"""One prepared check of meshserve on an accelerator: the machine's limits, paged decode attention (XLA vs Pallas),
and the engine's decode MBU / prefill MFU on a random ~1B Llama, with the correctness checks that gate them.

    PYTHONPATH=. python3 scripts/device_check.py --out=DIR [--mode=auto|full|tiny] [--budget_s=420]

(`scripts/device_check.sh [OUTDIR]` runs it with a hard time limit.) It needs only JAX, flax and numpy: the model
is random and initialized on the device, prompts are random token ids. `full` runs the accelerator sizes (~4 min on
one H200), `tiny` the same steps on a tiny float32 config on the CPU (Pallas kernels in interpret mode, with a
bfloat16 comparison still); `auto` picks `tiny` when JAX sees no accelerator.

Steps, each written to DIR/device_check.json (numbers with their units in the key) and DIR/device_check.md (the
summary, also printed) as soon as it ends, so a run cut short still leaves what it measured:
1. machine: versions, devices; memory bandwidth (a large-array read) and matmul FLOP/s (bench.roofline), in the
   same run as the figures they divide.
2. attention: engine.attention.paged_attend_xla and engine.pallas_attention.paged_attend_pallas at a 1B-Llama decode
   shape over a pool of shuffled pages, in bfloat16 and float32, each against a float32 XLA reference at the highest
   matmul precision; times (median of batches of back-to-back calls after warm-up) and the bandwidth they reach.
3. engine: Engine / warmup / prefill_batch / insert / generate only (the public calls): decode step time and MBU at
   each slot count, prefill MFU of a max_prefill_len prompt, and XLA compilations after warm-up (must be none).
The exit status is 0 only if every step ran and every check passed (errors within tolerance, no compiles after
warm-up); 1 otherwise, with the reasons under "failures".
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench import roofline as rl
from engine.attention import Int8Pages, dequantize_pool, paged_attend_xla, quantize_kv
from engine.config import ModelConfig, llama_1b_config, tiny_config
from engine.pallas_attention import paged_attend_pallas, unsupported_reason

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # what service.metrics counts as meshserve_compiles
JSON_NAME, SUMMARY_NAME = "device_check.json", "device_check.md"
# Largest |error| / max |reference| each result may show. XLA's float32 dots may run in TF32 on NVIDIA GPUs at the
# default precision (~1e-3 here); the Pallas kernel asks for IEEE float32 dots. bfloat16: the probabilities are
# rounded to bfloat16 before the value product (as in paged_attend_xla).
TOLERANCE = {("xla", "float32"): 5e-3, ("pallas", "float32"): 1e-4, ("xla", "bfloat16"): 3e-2}
TOLERANCE[("pallas", "bfloat16")] = TOLERANCE[("xla", "bfloat16")]
TOLERANCE[("xla", "int8")] = TOLERANCE[("pallas", "int8")] = TOLERANCE[("xla", "bfloat16")]  # bf16 q, int8 pages


def llama_1b_v32k() -> ModelConfig:
    """A random ~1.1B-parameter Llama (Llama-3.2-1B layers, a 32K vocabulary, untied embeddings)."""
    return llama_1b_config(
        vocab_size=32000, max_position_embeddings=4096, tie_embeddings=False, name="random-llama-1b-v32k"
    )


@dataclasses.dataclass(frozen=True)
class Profile:
    """The sizes of one mode."""

    name: str
    dtype: str
    """Engine dtype; the machine's limits are measured in it."""
    bandwidth_mb: int
    matmul_n: int
    attn_heads: tuple[int, int, int]
    """(K, G, H) of the attention comparison."""
    attn_positions: int
    """Positions per slot's table row (W * P); lengths are drawn in its last two pages."""
    attn_cases: tuple[tuple[int, int], ...]
    """(B, P) pairs."""
    attn_batches: int
    """Timed batches per implementation (the figure is their median)."""
    attn_calls: int
    """Back-to-back calls per batch."""
    attn_warmup: int
    """Untimed calls first (the first compiles)."""
    model: Callable[[], ModelConfig]
    max_seq_len: int
    max_prefill_len: int
    page_size: int
    decode_steps: int
    prompt_len: int
    """Prompt length of the decode runs (prefill MFU uses max_prefill_len)."""
    max_tokens: int
    prefill_repeats: int
    warm_dispatches: int
    timed_dispatches: int
    slot_counts: tuple[int, ...]
    budget_s: float
    """Elapsed seconds after which no further engine starts."""
    attention_option: str = "auto"
    """EngineConfig.attention of the engine runs."""


FULL = Profile(
    name="full",
    dtype="bfloat16",
    bandwidth_mb=1024,
    matmul_n=8192,
    attn_heads=(8, 4, 64),
    attn_positions=2048,
    attn_cases=((8, 16), (8, 64), (64, 16), (64, 64)),
    attn_batches=7,
    attn_calls=10,
    attn_warmup=3,
    model=llama_1b_v32k,
    max_seq_len=2048,
    max_prefill_len=1024,
    page_size=64,
    decode_steps=8,
    prompt_len=1000,
    max_tokens=512,
    prefill_repeats=5,
    warm_dispatches=2,
    timed_dispatches=8,
    slot_counts=(1, 8, 64),
    budget_s=420.0,
)
TINY = Profile(
    name="tiny",
    dtype="float32",
    bandwidth_mb=32,
    matmul_n=256,
    attn_heads=(2, 2, 32),
    attn_positions=64,
    attn_cases=((2, 16),),
    attn_batches=2,
    attn_calls=1,
    attn_warmup=1,
    model=tiny_config,
    max_seq_len=64,
    max_prefill_len=32,
    page_size=16,
    decode_steps=4,
    prompt_len=24,
    max_tokens=32,
    prefill_repeats=2,
    warm_dispatches=1,
    timed_dispatches=3,
    slot_counts=(1, 4),
    budget_s=80.0,
)


class Run:
    """The results so far, the failures, the clock and the output files."""

    def __init__(self, out_dir: str, profile: Profile) -> None:
        self.out_dir, self.profile = out_dir, profile
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {"schema": "meshserve-device-check/1", "mode": profile.name, "failures": []}
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == COMPILE_EVENT:
            self.compiles += 1

    def close(self) -> None:
        """Stops counting compilations (the listener is process-wide)."""
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {message}", flush=True)

    def fail(self, message: str) -> None:
        self.results["failures"].append(message)
        self.log(f"FAIL: {message}")

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Runs one step; an exception fails the step (with its traceback in the JSON) but not the ones after it."""
        self.log(f"{name} ...")
        try:
            self.results[name] = fn()
        except Exception as e:
            traceback.print_exc()
            self.results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            self.fail(f"{name}: {type(e).__name__}: {e}")
        self.write()
        return self.results[name]

    def write(self) -> None:
        self.results["ok"] = not self.results["failures"]
        self.results["elapsed_s"] = self.elapsed()
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, JSON_NAME), "w") as f:
            json.dump(self.results, f, indent=2, default=_jsonable)
        with open(os.path.join(self.out_dir, SUMMARY_NAME), "w") as f:
            f.write(summary(self.results))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


# ----------------------------------------------------------------------------------------------------- 1. machine


def machine(profile: Profile) -> dict[str, Any]:
    """Versions, devices, and this device's bandwidth and matmul FLOP/s in the profile's dtype, measured now."""
    import jaxlib

    device = jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    bandwidth = rl.measure_bandwidth(profile.dtype, megabytes=profile.bandwidth_mb, repeats=10)
    flops = rl.measure_matmul_flops(profile.dtype, n=profile.matmul_n, repeats=5)
    return {
        "ok": True,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{d.device_kind} (id {d.id})" for d in jax.devices()],
        "device_kind": device.device_kind,
        "device_memory_bytes": int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None,
        "python": sys.version.split()[0],
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "dtype": profile.dtype,
        "bandwidth_array_bytes": profile.bandwidth_mb * 2**20,
        "bandwidth_bytes_per_s": bandwidth,
        "matmul_shape": f"{profile.matmul_n}^3 x4 chained",
        "matmul_flop_per_s": flops,
    }


# --------------------------------------------------------------------------------------------------- 2. attention


def _time_calls(fn: Callable[[], Any], batches: int, calls: int, warmup: int) -> float:
    """Seconds per call: median over `batches` of (time of `calls` back-to-back calls, then one wait) / calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        out = [fn() for _ in range(calls)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def attention_case(profile: Profile, b: int, p: int, backend: str, interpret: bool, bandwidth: float, seed: int):
    """One (B, P): every implementation x dtype against the float32 reference, and its time and bandwidth."""
    kh, g, h = profile.attn_heads
    w = profile.attn_positions // p
    num_pages = b * w + 1  # page 0: the sink, never in a table here
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(b, w), jnp.int32)
    lengths_np = rng.integers(max(w * p - 2 * p, 0), w * p, b)
    lengths = jnp.asarray(lengths_np, jnp.int32)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    # score std ~1.5: a softmax neither flat nor one-hot, so errors in scores and values both show
    q32 = jax.random.normal(kq, (b, kh, g, h), jnp.float32) * (1.5 / math.sqrt(h))
    k32 = jax.random.normal(kk, (num_pages, kh, h, p), jnp.float32)
    v32 = jax.random.normal(kv, (num_pages, kh, p, h), jnp.float32)
    reference = jax.jit(paged_attend_xla)
    pallas = functools.partial(paged_attend_pallas, backend=backend, interpret=interpret)
    subjects = {
        "xla": jax.jit(paged_attend_xla),
        "pallas": jax.jit(pallas),
        "pallas_splits4": jax.jit(functools.partial(pallas, num_splits=4)),
    }
    pages_used = np.minimum(lengths_np // p + 1, w)
    rows = []
    for dtype in ("bfloat16", "float32"):
        args = (q32.astype(dtype), k32.astype(dtype), v32.astype(dtype), table, lengths)
        with jax.default_matmul_precision("highest"):
            want = reference(*(x.astype(jnp.float32) for x in args[:3]), table, lengths)
        want_max = float(jnp.abs(want).max())
        itemsize = jnp.dtype(dtype).itemsize
        page_bytes = p * kh * h * 2 * itemsize  # K and V of one page, all kv heads
        for name, fn in subjects.items():
            if name == "pallas_splits4" and dtype != "bfloat16":
                continue
            impl = "xla" if name == "xla" else "pallas"
            reason = None if impl == "xla" else unsupported_reason(backend, *args)
            row: dict[str, Any] = {"B": b, "P": p, "W": w, "impl": name, "dtype": dtype}
            if reason:
                rows.append({**row, "ok": False, "error": f"unsupported: {reason}"})
                continue
            got = fn(*args).astype(jnp.float32)
            err = float(jnp.abs(got - want).max())
            finite = bool(jnp.isfinite(got).all())
            tol = TOLERANCE[(impl, dtype)]
            row.update(
                ok=finite and err <= tol * want_max,
                max_abs_err=err,
                reference_max_abs=want_max,
                rel_err=err / want_max,
                tolerance_rel=tol,
            )
            if dtype == "bfloat16":
                seconds = _time_calls(
                    functools.partial(fn, *args), profile.attn_batches, profile.attn_calls, profile.attn_warmup
                )
                read = int((b * w if impl == "xla" else pages_used.sum()) * page_bytes)
                row.update(
                    time_s=seconds,
                    kv_bytes_read=read,
                    kv_bytes_needed=int((lengths_np + 1).sum() * page_bytes // p),
                    bandwidth_bytes_per_s=read / seconds,
                    fraction_of_measured_bandwidth=read / seconds / bandwidth,
                )
            rows.append(row)
    # int8 pages (EngineConfig.kv_dtype='int8') with bfloat16 q, against the float32 reference on the same pages
    # dequantized: the int8 rounding is in both, so the error is the bfloat16 products'
    k8, k8_scale = quantize_kv(k32.transpose(0, 1, 3, 2))
    k8 = Int8Pages(k8.transpose(0, 1, 3, 2), k8_scale)
    v8 = Int8Pages(*quantize_kv(v32))
    args = (q32.astype(jnp.bfloat16), k8, v8, table, lengths)
    with jax.default_matmul_precision("highest"):
        want = reference(q32, dequantize_pool(k8, keys=True), dequantize_pool(v8, keys=False), table, lengths)
    want_max = float(jnp.abs(want).max())
    page_bytes = p * kh * 2 * (h + k8_scale.dtype.itemsize)  # int8 K and V of one page, all kv heads, and scales
    for name, fn in subjects.items():
        impl = "xla" if name == "xla" else "pallas"
        reason = None if impl == "xla" else unsupported_reason(backend, *args)
        row = {"B": b, "P": p, "W": w, "impl": name, "dtype": "int8"}
        if reason:
            rows.append({**row, "ok": False, "error": f"unsupported: {reason}"})
            continue
        got = fn(*args).astype(jnp.float32)
        err = float(jnp.abs(got - want).max())
        tol = TOLERANCE[(impl, "int8")]
        seconds = _time_calls(
            functools.partial(fn, *args), profile.attn_batches, profile.attn_calls, profile.attn_warmup
        )
        read = int((b * w if impl == "xla" else pages_used.sum()) * page_bytes)
        row.update(
            ok=bool(jnp.isfinite(got).all()) and err <= tol * want_max,
            max_abs_err=err,
            reference_max_abs=want_max,
            rel_err=err / want_max,
            tolerance_rel=tol,
            time_s=seconds,
            kv_bytes_read=read,
            bandwidth_bytes_per_s=read / seconds,
            fraction_of_measured_bandwidth=read / seconds / bandwidth,
        )
        rows.append(row)
    return rows


def attention(profile: Profile, run: Run) -> dict[str, Any]:
    """Paged decode attention: XLA vs Pallas, bfloat16 and float32, against the float32 reference."""
    backend = jax.default_backend()
    pallas_backend = "tpu" if backend == "tpu" else "gpu"  # on the CPU: the GPU kernel, interpreted
    interpret = backend not in ("gpu", "tpu")
    bandwidth = run.results.get("machine", {}).get("bandwidth_bytes_per_s") or float("nan")
    kh, g, h = profile.attn_heads
    rows: list[dict[str, Any]] = []
    for i, (b, p) in enumerate(profile.attn_cases):
        rows += attention_case(profile, b, p, pallas_backend, interpret, bandwidth, seed=i)
        run.log(f"attention B={b} P={p} done")
    for r in rows:
        if not r["ok"]:
            run.fail(
                f"attention {r['impl']} {r['dtype']} B={r['B']} P={r['P']}: "
                + (r.get("error") or f"rel. error {r['rel_err']:.2e} > {r['tolerance_rel']:.0e}")
            )
    return {
        "ok": all(r["ok"] for r in rows),
        "pallas_backend": pallas_backend,
        "interpret": interpret,
        "K": kh,
        "G": g,
        "H": h,
        "positions_per_slot": profile.attn_positions,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------------ 3. engine


def engine_config(profile: Profile, slots: int, attention_option: str) -> tuple[Any, dict[str, Any]]:
    """The EngineConfig of one run, and the optional fields it set (those this engine version has)."""
    from engine.engine import EngineConfig

    names = {f.name for f in dataclasses.fields(EngineConfig)}
    pages_per_slot = profile.max_seq_len // profile.page_size
    optional = {
        "min_prefill_len": profile.max_prefill_len,  # one prefill bucket: fewer compiles
        "prefix_caching": False,  # every prompt is new anyway; no index kept
        "kv_pages": slots * pages_per_slot + 2 * slots + 8,  # the pool these runs need, not most of the device
    }
    optional = {k: v for k, v in optional.items() if k in names}
    config = EngineConfig(
        num_slots=slots,
        max_seq_len=profile.max_seq_len,
        max_prefill_len=profile.max_prefill_len,
        page_size=profile.page_size,
        decode_steps=profile.decode_steps,
        dtype=profile.dtype,
        attention=attention_option,
        **optional,
    )
    return config, optional


def _prompts(rng: np.random.Generator, vocab: int, n: int, length: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(2, vocab, length)] for _ in range(n)]  # never BOS 0 / EOS 1


def engine_run(profile: Profile, run: Run, model: ModelConfig, init: Callable[[], Any], slots: int, prefill: bool):
    """One engine of `slots` slots: warm-up, [prefill MFU], decode MBU, compiles after warm-up."""
    from engine.engine import Engine
    from engine.sampling import SamplingParams

    machine_ = run.results.get("machine", {})
    bandwidth = machine_.get("bandwidth_bytes_per_s") or float("nan")
    peak = machine_.get("matmul_flop_per_s") or float("nan")
    config, optional = engine_config(profile, slots, profile.attention_option)
    start = time.perf_counter()
    params = init()
    engine = Engine(model, params, config)
    del params
    construct_s = time.perf_counter() - start
    warmup_s = engine.warmup()
    run.log(f"engine {slots} slots: built in {construct_s:.1f} s, warm-up {warmup_s:.1f} s")
    compiles_before = run.compiles
    rng = np.random.default_rng(slots)
    n_params = engine.model_config.num_params
    itemsize = jnp.dtype(engine.config.dtype).itemsize
    weight_bytes = n_params * itemsize  # the engine's own figure (MemoryBudget.weight_bytes)
    kv_per_token = engine.model_config.kv_bytes_per_token(itemsize)
    out: dict[str, Any] = {
        "slots": slots,
        "attention": getattr(engine, "attention", None),
        "optional_config": optional,
        "engine_config": dataclasses.asdict(engine.config),
        "construct_s": construct_s,
        "warmup_s": warmup_s,
    }

    if prefill:
        tokens = profile.max_prefill_len
        once = SamplingParams(max_tokens=1, ignore_eos=True)
        times = []
        for i, prompt in enumerate(_prompts(rng, model.vocab_size, profile.prefill_repeats + 1, tokens)):
            t0 = time.perf_counter()
            (prefix,) = engine.prefill_batch([(prompt, once, i)])  # returns with the first token on the host
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - t0)
            engine.discard(prefix)
        seconds = statistics.median(times)
        out["prefill"] = {
            "prompt_tokens": tokens,
            "time_s": seconds,
            "tokens_per_s": tokens / seconds,
            "flop": 2 * n_params * tokens,
            "mfu": rl.mfu(n_params, tokens / seconds, peak),
        }

    params = SamplingParams(max_tokens=profile.max_tokens, ignore_eos=True)
    prompts = _prompts(rng, model.vocab_size, slots, profile.prompt_len)
    prefixes = engine.prefill_batch([(p, params, 1000 + i) for i, p in enumerate(prompts)])
    for slot, prefix in enumerate(prefixes):
        engine.insert(prefix, slot)
    lengths = np.full(slots, profile.prompt_len, np.int64)  # positions cached per slot
    for _ in range(profile.warm_dispatches):
        lengths += engine.generate().valid.sum(axis=0)
    steps = profile.decode_steps
    times, positions, tokens = [], 0, 0
    for _ in range(profile.timed_dispatches):
        t0 = time.perf_counter()
        step = engine.generate()  # one dispatch and its copy to the host
        times.append(time.perf_counter() - t0)
        valid = step.valid[:steps]
        before = np.cumsum(valid, axis=0) - valid  # tokens each slot added before each step
        positions += int((valid * (lengths[None, :] + before + 1)).sum())  # a step attends [0, length]
        lengths += valid.sum(axis=0)
        tokens += int(valid.sum())
    if tokens != slots * steps * profile.timed_dispatches:
        raise RuntimeError(f"expected every slot to decode every step; got {tokens} tokens")
    dispatch_s = statistics.median(times)
    step_s = dispatch_s / steps
    kv_bytes = positions * kv_per_token / (steps * profile.timed_dispatches)
    step_bytes = weight_bytes + kv_bytes
    out["decode"] = {
        "decode_steps": steps,
        "dispatch_s": dispatch_s,
        "step_s": step_s,
        "tokens_per_s": slots / step_s,
        "attended_positions_mean": positions / (steps * profile.timed_dispatches * slots),
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "bytes_per_step": step_bytes,
        "mbu": rl.mbu(weight_bytes, slots, kv_bytes / slots, step_s, bandwidth),
        "mfu": rl.mfu(n_params, slots / step_s, peak),
    }
    out["compiles_after_warmup"] = run.compiles - compiles_before
    out["ok"] = out["compiles_after_warmup"] == 0
    if not out["ok"]:
        run.fail(f"engine {slots} slots: {out['compiles_after_warmup']} XLA compilations after warm-up")
    del engine, prefixes
    gc.collect()
    return out


def engine_section(profile: Profile, run: Run) -> dict[str, Any]:
    """The engine at each slot count (one engine each), as long as the time budget allows."""
    try:
        from engine.engine import Engine, EngineConfig  # noqa: F401 (fail here, with the import's own message)
        from engine.model import init_params
    except Exception as e:
        raise RuntimeError(f"the engine does not import: {type(e).__name__}: {e}") from e
    model = profile.model()
    init = jax.jit(lambda: init_params(model, jnp.dtype(profile.dtype)))  # one compile, weights made on the device
    budget = profile.budget_s
    result: dict[str, Any] = {
        "model": dataclasses.asdict(model) | {"num_params": model.num_params},
        "dtype": profile.dtype,
        "prompt_len": profile.prompt_len,
        "runs": [],
        "skipped": [],
    }
    run.results["engine"] = result
    last = 0.0
    for i, slots in enumerate(profile.slot_counts):
        if run.elapsed() + 1.2 * last > budget:
            result["skipped"].append(slots)
            run.fail(f"engine {slots} slots: skipped, the time budget of {budget:.0f} s would be exceeded")
            continue
        t0 = time.perf_counter()
        try:
            result["runs"].append(engine_run(profile, run, model, init, slots, prefill=i == 0))
        except Exception as e:
            traceback.print_exc()
            result["runs"].append({"slots": slots, "ok": False, "error": f"{type(e).__name__}: {e}"})
            run.fail(f"engine {slots} slots: {type(e).__name__}: {e}")
        last = time.perf_counter() - t0
        run.write()
    result["ok"] = not result["skipped"] and all(r["ok"] for r in result["runs"])
    return result


# ----------------------------------------------------------------------------------------------------- summary


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def summary(results: dict[str, Any]) -> str:
    """The human summary: markdown tables of every figure the JSON holds, then the failures."""
    m = results.get("machine") or {}
    verdict = "PASS" if results.get("ok") else "FAIL"
    lines = [
        f"# meshserve device check: {verdict} ({results.get('mode')} mode, {m.get('device_kind', '?')}, "
        f"jax {m.get('jax_version', '?')}, {results.get('elapsed_s', 0):.0f} s)",
        "",
    ]
    if "bandwidth_bytes_per_s" in m:
        lines += [
            "| measured limit | value |",
            "|---|---|",
            f"| memory bandwidth ({m['dtype']} read of {m['bandwidth_array_bytes'] / 2**20:.0f} MiB) | "
            f"{m['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s |",
            f"| matmul ({m['dtype']} {m['matmul_shape']}) | {m['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s |",
            "",
        ]
    a = results.get("attention") or {}
    if a.get("rows"):
        lines += [
            f"## Paged decode attention (K={a['K']}, G={a['G']}, H={a['H']}, {a['positions_per_slot']} positions per "
            f"slot; Pallas backend {a['pallas_backend']}{', interpreted' if a['interpret'] else ''})",
            "",
            "| B | P | impl | dtype | rel. error | ok | time (us) | K/V read (MB) | GB/s | of measured bw |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a["rows"]:
            lines.append(
                f"| {r['B']} | {r['P']} | {r['impl']} | {r['dtype']} | {_f(r.get('rel_err'), '.1e')} | "
                f"{'yes' if r['ok'] else 'NO'} | {_f(r.get('time_s') and r['time_s'] * 1e6, '.1f')} | "
                f"{_f(r.get('kv_bytes_read') and r['kv_bytes_read'] / 1e6, '.4g')} | "
                f"{_f(r.get('bandwidth_bytes_per_s') and r['bandwidth_bytes_per_s'] / 1e9, '.4g')} | "
                f"{_f(r.get('fraction_of_measured_bandwidth'), '.0%')} |"
            )
        lines.append("")
    e = results.get("engine") or {}
    if e.get("model"):
        mc = e["model"]
        lines += [
            f"## Engine ({mc['name']}, {e['dtype']}, {_count(mc['num_params'])} params; prompts of "
            f"{e['prompt_len']} tokens)",
            "",
            "| slots | attention | step (ms) | tokens/s | bytes/step (GB) | MBU | MFU | compiles after warm-up | "
            "warm-up (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in e.get("runs", []):
            d = r.get("decode") or {}
            lines.append(
                f"| {r['slots']} | {r.get('attention', '-')} | {_f(d.get('step_s') and d['step_s'] * 1e3, '.2f')} | "
                f"{_f(d.get('tokens_per_s'), '.0f')} | "
                f"{_f(d.get('bytes_per_step') and d['bytes_per_step'] / 1e9, '.3f')} | {_f(d.get('mbu'), '.1%')} | "
                f"{_f(d.get('mfu'), '.1%')} | {r.get('compiles_after_warmup', '-')} | {_f(r.get('warmup_s'), '.1f')} |"
            )
        for r in e.get("runs", []):
            if "prefill" in r:
                pf = r["prefill"]
                lines += [
                    "",
                    f"Prefill of {pf['prompt_tokens']} tokens: {pf['time_s'] * 1e3:.1f} ms, "
                    f"{pf['tokens_per_s']:.0f} tokens/s, MFU {pf['mfu']:.1%}.",
                ]
        lines.append("")
    if results.get("failures"):
        lines += ["## Failures", ""] + [f"- {f}" for f in results["failures"]] + [""]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    backend = jax.default_backend()
    flag = flags.FLAGS
    mode = flag.mode if flag.mode != "auto" else ("tiny" if backend == "cpu" else "full")
    profile = FULL if mode == "full" else TINY
    overrides: dict[str, Any] = {"attention_option": flag.attention}
    if flag.slot_counts:
        overrides["slot_counts"] = tuple(int(s) for s in flag.slot_counts)
    if flag.budget_s is not None:
        overrides["budget_s"] = flag.budget_s
    profile = dataclasses.replace(profile, **overrides)
    run = Run(flag.out, profile)
    run.log(f"device check, {mode} mode, backend {backend}, {jax.devices()[0].device_kind}, writing {flag.out}")
    try:
        run.section("machine", lambda: machine(profile))
        run.section("attention", lambda: attention(profile, run))
        run.section("engine", lambda: engine_section(profile, run))
    except KeyboardInterrupt:
        run.fail("interrupted (time limit?) before every step ended")
    run.close()
    run.write()
    text = summary(run.results)
    print("\n" + text, flush=True)
    return 0 if run.results["ok"] else 1


def define_flags() -> None:
    """The command line (defined only when run as a script, so tests can import this module)."""
    flags.DEFINE_string("out", os.environ.get("OUT") or "device_check_out", "Directory for the JSON and summary.")
    flags.DEFINE_enum(
        "mode", os.environ.get("DEVICE_CHECK_MODE", "auto"), ["auto", "full", "tiny"], "Sizes; auto: tiny on a CPU."
    )
    flags.DEFINE_float("budget_s", None, "Elapsed seconds after which no further engine starts (default per mode).")
    flags.DEFINE_list("slot_counts", None, "Engine slot counts (default per mode: 1,8,64 full, 1,4 tiny).")
    flags.DEFINE_string("attention", "auto", "EngineConfig.attention of the engine runs.")


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
