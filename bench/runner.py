"""The benchmark commands (roofline, latency, throughput, serve, sweep) as functions of one options dataclass.

Each command returns a JSON-ready dict of its figures; `scripts/benchmark.py` adds the machine, versions and flags,
writes it, and draws the plots. Figures follow shared/PERFORMANCE.md: W1 latency (TTFT, decode tokens/s, MBU/MFU),
W2 offline throughput (output tokens/s, wall time, model load and a warm-up run excluded, median of repeats), W3
online serving (TTFT / TPOT / ITL / e2e percentiles, throughput, goodput, failures). Machine limits are measured in
the same run as the figures they divide.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from bench import quality, stats, step_profile, workloads
from bench import roofline as rl
from bench.workloads import Prompt
from engine import placement, quant
from engine.config import ModelConfig, llama_1b_config, tiny_config
from engine.engine import CapacityError, Engine, EngineConfig, default_dtype
from engine.model import abstract_params, init_params
from engine.offline import OfflineItem, OfflineResult, run_offline
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import Tokenizer, make_tiny_tokenizer

log = logging.getLogger(__name__)


def small_config() -> ModelConfig:
    """The tiny model's byte vocabulary at ~3M parameters: a prompt token costs a measurable ~0.1 ms of prefill on
    this CPU, so where a fleet's routing makes replicas recompute histories, TTFT shows it (the tiny model's prefill
    costs next to nothing: its TTFT is the gateway, gRPC and dispatch waits)."""
    return tiny_config(
        dim=256, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=768, name="small-random-llama"
    )


RANDOM_MODELS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny_config,
    "small": small_config,
    "1b": llama_1b_config,
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a benchmark command needs; `scripts/benchmark.py` maps its flags onto this in one place."""

    checkpoint: str | None = None
    """'bundled'/None (SmolLM2-135M), an orbax dir, a .gguf or an HF folder; ignored when `random_model` is set."""
    random_model: str | None = None
    """Random weights of a named config instead of a checkpoint: "tiny" or "1b"."""
    dtype: str = dataclasses.field(default_factory=default_dtype)
    """Engine dtype (and the dtype the device limits are measured in)."""
    num_slots: int = 64
    """Slots of the throughput / serve engine."""
    slot_counts: tuple[int, ...] = (1, 4, 16, 64)
    """Slot counts for latency decode, roofline tables and the slot sweep."""
    max_seq_len: int = 512
    max_prefill_len: int = 256
    fine_prefill_buckets: bool = True
    """Prefill buckets at powers of two and 1.5x them (EngineConfig.fine_prefill_buckets)."""
    page_size: int = 64
    decode_steps: int = 8
    prefills_per_step: int = 64
    prefill_token_budget: int | None = 256
    """Serve: most prompt tokens read between two decode dispatches while requests decode (None: all at once)."""
    prefill_segments: int = 32
    prefix_caching: bool = True
    kv_pages: int | None = None
    admission: str = "reserve"
    host_kv_bytes: int = 0
    """Prefix cache positions (0: off). Every offline run and TTFT measurement starts with it empty."""
    attention: str = "auto"
    """Decode attention: auto, kernel or xla (EngineConfig.attention)."""
    linear: str = "auto"
    """Weight products: auto, kernel or xla (EngineConfig.linear)."""
    quantize: str = "none"
    """Weight format: none or int8 (EngineConfig.quantize)."""
    kv_dtype: str = "auto"
    """KV cache format: auto or int8 (EngineConfig.kv_dtype)."""
    huge_pages: bool = True
    """CPU: weights in 2 MiB pages (EngineConfig.huge_pages)."""
    workload: str = "w2"
    """Synthetic prompt set: w1, w2 or w3; `serve` also runs w4 (multi-turn chat) and w5 (long prompt)."""
    prompts_file: str | None = None
    """JSONL prompts instead of the synthetic set."""
    random_prompt_lens: tuple[int, ...] = ()
    """Random token prompts of these lengths instead of the synthetic set (`num_prompts` of each)."""
    num_prompts: int | None = None
    """Use only the first n prompts of the set (or n random prompts per length)."""
    max_tokens: int = workloads.OUTPUT_TOKENS
    """Tokens generated per prompt (exactly: EOS ignored)."""
    ttft_prompt_lens: tuple[int, ...] = (16, 64, 256)
    """Latency: random prompt lengths whose TTFT is measured besides the W1 prompt."""
    repeats: int = 3
    """Timed repetitions; figures are medians."""
    device_spec: tuple[str, ...] = ()
    """Presets to predict for besides this device (tpu_v5e, tpu_v6e, h100, h200)."""
    chips: int = 1
    """Chips the model is sharded over (roofline predictions)."""
    contexts: tuple[int, ...] = (256, 1024, 4096)
    """Roofline: context lengths of the prediction table."""
    bandwidth_mb: int = 512
    matmul_n: int = 2048
    baseline: str | None = None
    """Throughput: "hf" also runs HF transformers' generate on the same ids."""
    hf_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    target: str | None = None
    """Serve: host:port of a running server (the base URL of the OpenAI API with `api` openai / both); None starts
    one in this process (and the gateway in front of it)."""
    api: str = "grpc"
    """Serve: "grpc" (MeshServe's API), "openai" (the gateway's OpenAI HTTP API, streamed) or "both" (the W3 request
    set each way on the same server: the gateway's overhead)."""
    replica_target: str | None = None
    """Serve with an OpenAI `target`: host:port of the gRPC API behind it (the direct runs of "both"; GetLoad in W4)."""
    api_key: str | None = dataclasses.field(default=None, repr=False)
    """Serve over OpenAI: the key sent as a bearer token (never written to the results)."""
    gateway_rounds: int = 1
    """Serve "both": rounds of (direct, gateway) back to back, the order alternating between rounds."""
    gateway_mix: str = "rounds"
    """Serve --api=both: "rounds" (each round a run direct, then one through the gateway, or the reverse) or
    "interleaved" (each round one arrival schedule at the rate, its requests alternately direct and through the
    gateway, so both meet the same load, the gateway's own CPU included)."""
    gateway_tcp_nodelay: bool = False
    """Experiment: TCP_NODELAY on the in-process gateway's listening socket (bench/gateway_load.set_tcp_nodelay)."""
    auth_duration_s: float = 10.0
    """gateway_auth: seconds of timed load (after one second of warm-up)."""
    auth_connections: int = 8
    """gateway_auth: client connections kept busy at once."""
    auth_limits: str = "all"
    """gateway_auth: "all" (the user has every limit, set too high to trip) or "none"."""
    auth_gate: str = "store"
    """gateway_auth: "store" (StoreGate, keys required) or "open" (OpenGate: the gateway without its store)."""
    gateway_profile: str | None = None
    """gateway_auth: profile the gateway process with "py-spy" or "cprofile"."""
    py_spy: str | None = None
    """gateway_auth: the py-spy binary (default: the one on PATH)."""
    gateway_loop: str = "asyncio"
    """gateway_auth: the gateway process's event loop, "asyncio" (as scripts/gateway.py) or "uvloop"."""
    gateway_pythonpath: tuple[str, ...] = ()
    """gateway_auth: folders put first on the gateway process's import path (e.g. one holding httptools)."""
    request_rates: tuple[float, ...] = (1.0, math.inf)
    concurrency: tuple[int, ...] = ()
    """Serve: fixed concurrencies instead of rates."""
    burstiness: float = 1.0
    num_requests: int = 64
    warmup_requests: int = 2
    users: int = 16
    """Serve W4: chat users, one conversation each."""
    turns: int = 8
    """Serve W4: turns per conversation."""
    w4_stagger_s: float = 0.5
    """Serve W4: seconds between two users' first turns."""
    long_prompt_tokens: int = 6000
    """Serve W5: tokens of the long prompt (chat template included)."""
    seed: int = 0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_e2e_ms: float | None = None
    sweep_over: str = "slots"
    """Sweep: "slots" (offline throughput per slot count) or "rates" (serving latency per request rate)."""
    min_gain: float = 0.05
    """Sweep: a larger slot count must raise throughput by at least this fraction to be worth its memory."""
    min_slo_attainment: float = 0.9
    """Sweep over rates: the share of requests that must meet the SLOs."""
    progress: bool = True

    @property
    def slo(self) -> stats.SLO:
        def secs(ms: float | None) -> float | None:
            return None if ms is None else ms / 1e3

        return stats.SLO(ttft=secs(self.slo_ttft_ms), tpot=secs(self.slo_tpot_ms), e2e=secs(self.slo_e2e_ms))


# ----- models, prompts, machine -----------------------------------------------------------------------------------


def model_config(opts: Options) -> ModelConfig:
    """The model's architecture without loading its weights."""
    if opts.random_model:
        return _random_config(opts.random_model)
    from checkpoints.bundled import resolve_checkpoint
    from checkpoints.orbax_io import load_config

    return load_config(resolve_checkpoint(opts.checkpoint))


def _random_config(name: str) -> ModelConfig:
    if name not in RANDOM_MODELS:
        raise ValueError(f"unknown random model {name!r}; choose one of {', '.join(RANDOM_MODELS)}")
    return RANDOM_MODELS[name]()


def engine_config(opts: Options, num_slots: int | None = None) -> EngineConfig:
    return EngineConfig(
        num_slots=num_slots or opts.num_slots,
        max_seq_len=opts.max_seq_len,
        max_prefill_len=min(opts.max_prefill_len, opts.max_seq_len),
        fine_prefill_buckets=opts.fine_prefill_buckets,
        page_size=min(opts.page_size, opts.max_seq_len),
        decode_steps=opts.decode_steps,
        prefill_segments=opts.prefill_segments,
        prefix_caching=opts.prefix_caching,
        kv_pages=opts.kv_pages,
        admission=opts.admission,
        host_kv_bytes=opts.host_kv_bytes,
        dtype=opts.dtype,
        attention=opts.attention,
        linear=opts.linear,
        quantize=opts.quantize,
        kv_dtype=opts.kv_dtype,
        huge_pages=opts.huge_pages,
    )


_ENGINES: dict[tuple[Any, ...], tuple[Engine, Tokenizer]] = {}


def load_model(opts: Options, num_slots: int | None = None) -> tuple[Engine, Tokenizer]:
    """The engine and its tokenizer: random weights of a named config, or a checkpoint. Engines are kept for the
    life of the process, keyed by model and engine config, so commands run one after another (tests, a sweep) reuse
    the weights and every shape already compiled."""
    config = engine_config(opts, num_slots)
    key = (opts.random_model, None if opts.random_model else opts.checkpoint, config)
    if key in _ENGINES:
        return _ENGINES[key]
    # the same weights converted: never from an int8 engine to one of another format (its rounding would stay)
    same_model = next(
        (
            v
            for k, v in _ENGINES.items()
            if k[:2] == key[:2] and k[2].dtype == config.dtype and k[2].quantize in ("none", config.quantize)
        ),
        None,
    )
    if same_model is not None:
        engine = with_slots(same_model[0], config.num_slots, config)
        tokenizer = same_model[1]
    elif opts.random_model:
        cfg = _random_config(opts.random_model)
        engine = Engine(cfg, init_params(cfg, jnp.dtype(opts.dtype)), config)
        tokenizer = make_tiny_tokenizer(max(cfg.vocab_size, 256))
    else:
        from engine.load import load_engine

        engine, tokenizer = load_engine(opts.checkpoint, config)
    _ENGINES[key] = (engine, tokenizer)
    return engine, tokenizer


def with_slots(engine: Engine, num_slots: int, config: EngineConfig | None = None) -> Engine:
    """An engine of `num_slots` slots (and otherwise `config`, default the engine's) on the same weights, nothing
    copied; raises CapacityError if it cannot fit."""
    config = dataclasses.replace(config or engine.config, num_slots=num_slots)
    if config == engine.config:
        return engine
    return Engine(engine.model_config, engine.params, config, mesh=engine.mesh, rules=engine.rules)


def prompts(opts: Options, vocab_size: int) -> list[Prompt]:
    """The prompt set the options name: random token prompts, a JSONL file, or a synthetic workload."""
    if opts.random_prompt_lens:
        return workloads.random_token_prompts(
            opts.random_prompt_lens, vocab_size, count=opts.num_prompts or 1, seed=opts.seed, max_tokens=opts.max_tokens
        )
    if opts.prompts_file:
        out = workloads.jsonl_prompts(opts.prompts_file, opts.max_tokens)
    else:
        out = workloads.workload(opts.workload, opts.max_tokens)
    return out[: opts.num_prompts] if opts.num_prompts else out


def workload_name(opts: Options) -> str:
    """The standard name (W1, W2, W3) when the full synthetic set runs, else "custom"."""
    full = workloads.workload(opts.workload)
    if opts.prompts_file or opts.random_prompt_lens or (opts.num_prompts and opts.num_prompts < len(full)):
        return "custom"
    return opts.workload.upper()


def model_summary(engine: Engine) -> dict[str, Any]:
    c, b = engine.model_config, engine.budget
    return {
        "name": c.name,
        "n_params": c.num_params,
        "weight_bytes": b.weight_bytes,
        "kv_bytes_per_token": b.kv_bytes_per_token,
        "dtype": engine.config.dtype,
        "attention": engine.attention,
        "linear": engine.linear,
        "one_token_prefetch": engine.kernel_prefetch,  # the CPU kernel's choice for this model (None: not run)
        "engine": dataclasses.asdict(engine.config),
    }


def machine() -> dict[str, Any]:
    """Where the run happened and with what software."""
    devices = jax.devices()
    out: dict[str, Any] = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "hostname": platform.node(),
        "python": sys.version.split()[0],
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__, "numpy": np.__version__},
    }
    out["cpu"] = _cpu()
    try:
        import flax

        out["versions"]["flax"] = flax.__version__
    except ImportError:
        pass
    return out


def _cpu() -> dict[str, Any]:
    """The host CPU as /proc/cpuinfo names it (VMs often say only "AMD EPYC": family and model tell Zen 3 from Zen 4)
    and its widest vector ISA, which the CPU kernels are built for."""
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
    except OSError:
        return {"model": platform.processor() or platform.machine()}
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = set(info.get("flags", "").split())
    isa = next((name for name in ("avx512f", "avx2", "avx") if name in flags), None)
    model = info.get("model name")
    return {"model": model, "family": info.get("cpu family"), "model_id": info.get("model"), "isa": isa}


def limits(opts: Options) -> rl.DeviceSpec:
    """This device's bandwidth and matmul FLOP/s in the engine's dtype, measured now."""
    return rl.measure_device(opts.dtype, megabytes=opts.bandwidth_mb, matmul_n=opts.matmul_n)


def _bar(opts: Options, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not opts.progress, leave=False)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


# ----- roofline ---------------------------------------------------------------------------------------------------


def roofline(opts: Options, *, measured: rl.DeviceSpec | None = None) -> dict[str, Any]:
    """Weight bytes, KV bytes/token, critical batch and predicted decode per (slots, context), for this device
    (measured unless given) and each preset (presets are bf16 figures, so their predictions use bf16 weights)."""
    cfg = model_config(opts)
    itemsize = jnp.dtype(opts.dtype).itemsize
    here = measured or limits(opts)
    # (device, weight bytes, KV bytes per token, dtype bytes, weight format) per row
    int8_weights = quant.weight_bytes(abstract_params(cfg, jnp.bfloat16, quantize="int8")[0])
    int8_kv = placement.kv_bytes_per_token(cfg, jnp.bfloat16, "int8")
    kv_here = placement.kv_bytes_per_token(cfg, opts.dtype, opts.kv_dtype)
    fmt_here = "dense" if opts.kv_dtype == "auto" else "int8 KV"
    devices = {"this_device": (here, cfg.num_params * itemsize, kv_here, itemsize, fmt_here)}
    for name in opts.device_spec:
        device = rl.preset(name)
        devices[name] = (device, cfg.num_params * 2, cfg.kv_bytes_per_token(2), 2, "bf16")
        devices[f"{name}_int8_kv"] = (device, cfg.num_params * 2, int8_kv, 2, "bf16 weights + int8 KV")
        devices[f"{name}_int8_weights"] = (device, int8_weights, cfg.kv_bytes_per_token(2), 2, "int8 weights")
        devices[f"{name}_int8_weights_kv"] = (device, int8_weights, int8_kv, 2, "int8 weights + int8 KV")
    out: dict[str, Any] = {"model": {"name": cfg.name, "n_params": cfg.num_params}, "devices": {}}
    for key, (device, weight_bytes, kv_bytes, nbytes, fmt) in devices.items():
        line = rl.Roofline(cfg.num_params, weight_bytes, kv_bytes, device, opts.chips)
        out["devices"][key] = {
            **line.summary(),
            "format": fmt,
            "dtype_bytes": nbytes,
            "critical_batch_at_context": {str(c): line.critical_batch_at(c) for c in opts.contexts},
            "kv_pages": line.kv_pages(opts.page_size),
            "max_slots_at_max_seq_len": line.max_slots(opts.max_seq_len, page_size=opts.page_size),
            "sequences_held_at_context": {str(c): line.sequences_held(c, opts.page_size) for c in opts.contexts},
            "table": line.table(opts.slot_counts, opts.contexts),
        }
    return out


def roofline_for(engine: Engine, device: rl.DeviceSpec) -> rl.Roofline:
    b = engine.budget
    return rl.Roofline(engine.model_config.num_params, b.weight_bytes, b.kv_bytes_per_token, device)


# ----- latency (W1) -----------------------------------------------------------------------------------------------


def compile_all(
    engine: Engine, kinds: Sequence[str] = ("prefill", "insert", "generate", "release")
) -> dict[str, float]:
    """Compiles every shape of the given kinds not compiled yet, timing each: {"kind/size": seconds}."""
    shapes = [shape for shape in engine.shapes if shape[0] in kinds]
    seconds = {}
    for kind, size in shapes:
        if (kind, size) in engine.compiled_shapes:
            continue
        start = time.perf_counter()
        engine._compile(kind, size)
        seconds[f"{kind}/{size}"] = time.perf_counter() - start
    return seconds


def measure_ttft(engine: Engine, ids: Sequence[int], repeats: int, *, cached: bool = False) -> list[float]:
    """Wall times of `repeats` prefills of `ids` (first token on the host), after one untimed run: computed in full
    (the prefix cache emptied before each), or with all but the last token read from cached pages."""
    params = _greedy(2)
    times = []
    for i in range(repeats + 1):
        if not cached:
            engine.clear_prefix_cache()
        start = time.perf_counter()
        prefix = engine.prefill(ids, params, seed=0)
        engine.discard(prefix)
        if i:
            times.append(time.perf_counter() - start)
            if cached != (prefix.cached > 0):
                raise RuntimeError(f"prefill read {prefix.cached} cached tokens; expected cached={cached}")
    return times


@dataclasses.dataclass(frozen=True)
class DecodePass:
    """One timed generation of `max_tokens` tokens in every slot."""

    seconds: float
    tokens: int
    steps: int
    bytes_read: float
    """Weights once per step plus the KV cache the attention read, summed over the dispatches."""
    kv_bytes_read: float
    """The KV cache part of `bytes_read`."""

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def decode_pass(engine: Engine, ids: Sequence[int], max_tokens: int) -> DecodePass:
    """Fills every slot with the prompt, then times `generate` dispatches until all slots have `max_tokens` tokens.

    Bytes read per step: the weights, plus the KV cache positions the attention read (whole pages of the window
    for XLA's formulation, each slot's positions up to its length for the CPU kernel: `Engine.kv_positions_read`).
    """
    b, e = engine.config.num_slots, engine.config
    engine.reset()
    for slot in range(b):  # the first computes the prompt, the others share its pages
        engine.insert(engine.prefill(ids, _greedy(max_tokens), seed=0), slot)
    jax.block_until_ready(engine.state)
    seconds, tokens, steps, kv_positions = 0.0, 0, 0, 0
    active = True
    while active:
        lengths = engine.host_lengths.copy()
        start = time.perf_counter()
        out = engine.generate()
        seconds += time.perf_counter() - start
        tokens += int(out.valid.sum())
        steps += e.decode_steps
        kv_positions += engine.kv_positions_read(lengths, out.valid, e.decode_steps, engine.last_window)
        active = bool(out.active.any())
    for slot in range(b):
        engine.release(slot)
    kv_bytes = kv_positions * engine.budget.kv_bytes_per_token
    return DecodePass(seconds, tokens, steps, steps * engine.budget.weight_bytes + kv_bytes, kv_bytes)


def latency(opts: Options) -> dict[str, Any]:
    """W1: TTFT per prompt length (prefill MFU), decode tokens/s per slot count (MBU, MFU), compile time per shape."""
    base, tokenizer = load_model(opts, num_slots=min(opts.slot_counts))
    device = limits(opts)
    n_params = base.model_config.num_params
    # W1 is the first prompt of the standard set; a JSONL or random set puts its own first prompt in its place.
    first = prompts(opts, base.model_config.vocab_size)[0]
    w1_ids = workloads.encode(first, tokenizer)
    ttft_prompts = [(first.id, w1_ids)]
    lens = [n for n in opts.ttft_prompt_lens if n < base.config.max_seq_len]
    for p in workloads.random_token_prompts(lens, base.model_config.vocab_size, seed=opts.seed):
        ttft_prompts.append((p.id, list(p.token_ids)))
    bar = _bar(opts, len(ttft_prompts) + len(opts.slot_counts), "latency")
    compile_seconds = {"prefill": compile_all(base, ("prefill",))}
    ttft_rows = []
    for name, ids in ttft_prompts:
        times = measure_ttft(base, ids, opts.repeats)
        ttft = statistics.median(times)
        cached = None
        if base.config.prefix_caching and len(ids) > 1:
            cached = statistics.median(measure_ttft(base, ids, opts.repeats, cached=True)) * 1e3
        ttft_rows.append(
            {
                "prompt": name,
                "prompt_tokens": len(ids),
                "bucket": base.bucket_for(min(len(ids), base.config.max_prefill_len)),
                "ttft_ms": ttft * 1e3,
                "runs_ms": [t * 1e3 for t in times],
                "prefill_tokens_per_s": len(ids) / ttft,
                "prefill_mfu": rl.mfu(n_params, len(ids) / ttft, device.peak_flops),
                "ttft_cached_ms": cached,
            }
        )
        bar.update(1)
    line = roofline_for(base, device)
    decode_rows = []
    for b in opts.slot_counts:
        try:
            engine, _ = load_model(opts, num_slots=b)
        except CapacityError as exc:
            decode_rows.append({"slots": b, "error": str(exc)})
            bar.update(1)
            continue
        compile_seconds[f"slots={b}"] = compile_all(engine, ("insert", "generate"))
        decode_pass(engine, w1_ids, opts.max_tokens)  # warm-up, excluded
        passes = sorted(
            (decode_pass(engine, w1_ids, opts.max_tokens) for _ in range(opts.repeats)), key=lambda p: p.seconds
        )
        mid = passes[len(passes) // 2]
        mean_context = len(w1_ids) + opts.max_tokens / 2
        decode_rows.append(
            {
                "slots": b,
                "tokens_per_s": mid.tokens_per_s,
                "step_ms": mid.step_seconds * 1e3,
                "tpot_ms": mid.step_seconds * 1e3,
                "mbu": mid.bytes_read / mid.seconds / device.bandwidth,
                "kv_bytes_per_step": mid.kv_bytes_read / mid.steps,
                "mfu": rl.mfu(n_params, mid.tokens_per_s, device.peak_flops),
                "runs_tokens_per_s": [p.tokens_per_s for p in passes],
                "predicted_tokens_per_s": line.tokens_per_second(b, int(mean_context)),
            }
        )
        bar.update(1)
    bar.close()
    w1_decode = next((r for r in decode_rows if r["slots"] == 1 and "error" not in r), None)
    return {
        "workload": "W1" if first.id == "robot-0" else "custom",
        "model": model_summary(base),
        "limits": {"bandwidth_gb_s": device.bandwidth / 1e9, "peak_tflop_s": device.peak_flops / 1e12},
        "critical_batch": line.critical_batch,
        "ttft": ttft_rows,
        "decode": decode_rows,
        "compile_seconds": compile_seconds,
        "w1": {
            "prompt_tokens": len(w1_ids),
            "output_tokens": opts.max_tokens,
            "ttft_ms": ttft_rows[0]["ttft_ms"],
            "decode_tokens_per_s": None if w1_decode is None else w1_decode["tokens_per_s"],
            "mbu": None if w1_decode is None else w1_decode["mbu"],
        },
    }


# ----- throughput (W2) --------------------------------------------------------------------------------------------


def _offline_items(prompt_set: Sequence[Prompt], ids: Sequence[Sequence[int]], tag: str) -> list[OfflineItem]:
    return [
        OfflineItem(f"{tag}-{p.id}", _greedy(p.max_tokens), token_ids=list(t))
        for p, t in zip(prompt_set, ids, strict=True)
    ]


def _offline_run(scheduler: Scheduler, items: list[OfflineItem]) -> tuple[float, list[OfflineResult], int]:
    """(wall seconds, results, prompt tokens read from the prefix cache) of one job, started with the cache empty:
    reuse inside the job counts, reuse of an earlier run's prompts would not be a fair repeat."""
    scheduler.engine.clear_prefix_cache()
    hits = scheduler.engine.prefix_stats.hit_tokens
    start = time.perf_counter()
    results = run_offline(scheduler, items)
    return time.perf_counter() - start, results, scheduler.engine.prefix_stats.hit_tokens - hits


def offline_figures(
    engine: Engine, tokenizer: Tokenizer, prompt_set: Sequence[Prompt], opts: Options
) -> dict[str, Any]:
    """Offline generation of the prompt set (warm-up excluded, median of `repeats` runs), with the TPOT each request
    saw: (e2e - TTFT) / (tokens - 1), all requests submitted at the start of the run."""
    ids = [workloads.encode(p, tokenizer) for p in prompt_set]
    compile_start = time.perf_counter()
    engine.warmup()
    compile_s = time.perf_counter() - compile_start
    scheduler = Scheduler(engine, tokenizer, prefills_per_step=opts.prefills_per_step)
    warm = min(len(prompt_set), engine.config.num_slots)
    _offline_run(scheduler, _offline_items(prompt_set[:warm], ids[:warm], "warmup"))
    runs = []
    bar = _bar(opts, opts.repeats, f"offline slots={engine.config.num_slots}")
    for r in range(opts.repeats):
        runs.append(_offline_run(scheduler, _offline_items(prompt_set, ids, f"run{r}")))
        bar.update(1)
    bar.close()
    runs.sort(key=lambda run: run[0])
    wall, results, cached_tokens = runs[len(runs) // 2]
    ok = [x for x in results if x.error is None]
    tokens = sum(x.completion_tokens for x in ok)
    expected = [p.max_tokens for p in prompt_set]
    return {
        "prompts": len(prompt_set),
        "prompt_tokens": sum(len(t) for t in ids),
        "output_tokens": tokens,
        "exact_lengths": [x.completion_tokens for x in results] == expected,
        "failed": [{"id": x.id, "error": x.error} for x in results if x.error is not None],
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "runs_wall_s": [w for w, _, _ in runs],
        "prefix_cache_tokens": cached_tokens,
        "compile_s": compile_s,
        "ttft_ms": stats.summarize((x.ttft_s for x in ok), 1e3),
        "tpot_ms": stats.summarize(
            (stats.tpot(x.latency_s, x.ttft_s, x.completion_tokens) for x in ok if x.ttft_s is not None), 1e3
        ),
        "_ids": ids,
        "_tokens": [x.token_ids for x in results],
    }


def throughput(opts: Options) -> dict[str, Any]:
    """W2: output tokens/s and wall time of one offline job; with `baseline="hf"`, HF generate on the same ids."""
    engine, tokenizer = load_model(opts)
    prompt_set = prompts(opts, engine.model_config.vocab_size)
    figures = offline_figures(engine, tokenizer, prompt_set, opts)
    ids, tokens = figures.pop("_ids"), figures.pop("_tokens")
    out: dict[str, Any] = {
        "workload": workload_name(opts),
        "model": model_summary(engine),
        "meshserve": figures,
    }
    if opts.baseline == "hf":
        out["hf"] = hf_figures(engine, ids, [p.max_tokens for p in prompt_set], opts, tokens)
        out["speedup_vs_hf"] = figures["output_tokens_per_s"] / out["hf"]["output_tokens_per_s"]
    elif opts.baseline not in (None, "", "none"):
        raise ValueError(f"unknown baseline {opts.baseline!r}; the only baseline is 'hf'")
    return out


def hf_figures(
    engine: Engine,
    ids: Sequence[Sequence[int]],
    new_tokens: Sequence[int],
    opts: Options,
    ours: Sequence[Sequence[int]],
) -> dict[str, Any]:
    """HF transformers' best static batch on the engine's own weights, and how many outputs match meshserve's."""
    from bench import hf_baseline

    model = hf_baseline.hf_model(engine.model_config, engine.params, opts.dtype)
    sizes = sorted({min(s, len(ids)) for s in opts.hf_batch_sizes})
    bar = _bar(opts, len(sizes) * opts.repeats, "hf generate")
    runs, outputs = hf_baseline.run_baseline(
        model, ids, new_tokens, batch_sizes=sizes, repeats=opts.repeats, pad_id=0, progress=lambda: bar.update(1)
    )
    bar.close()
    best = max(runs, key=lambda r: r.tokens_per_s)
    return {
        **hf_baseline.versions(),
        "best_batch_size": best.batch_size,
        "wall_s": best.wall_s,
        "output_tokens": best.output_tokens,
        "output_tokens_per_s": best.tokens_per_s,
        "by_batch_size": [
            {"batch_size": r.batch_size, "wall_s": r.wall_s, "tokens_per_s": r.tokens_per_s, "runs_s": r.runs_s}
            for r in runs
        ],
        "identical_outputs": sum(list(a) == list(b) for a, b in zip(outputs, ours, strict=True)),
    }


# ----- serve (W3) -------------------------------------------------------------------------------------------------

APIS = ("grpc", "openai", "both")
GATEWAY_TTFT_GOAL = 1.05
"""`serve --api=both`: the gateway's TTFT p50 over the direct gRPC one that issue 15 asks for at most."""


@dataclasses.dataclass
class _Targets:
    """Where `serve` sends its requests: the MeshServe gRPC API and / or an OpenAI HTTP API (the gateway's)."""

    grpc: str | None
    http: str | None
    server: Any = None
    gateway: Any = None

    def close(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.server is not None:
            self.server.drain(timeout=0)
            self.server.stop(grace=0)


def _serve_targets(opts: Options) -> tuple[_Targets, Tokenizer | None]:
    """The targets `opts` name; without `target`, an engine server started here and (for openai / both) the open
    gateway in front of it, both on loopback."""
    if opts.api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {opts.api!r}")
    if opts.target is not None:
        if opts.api == "grpc":
            return _Targets(opts.target, None), None
        if opts.api == "both" and not opts.replica_target:
            raise ValueError("--api=both with --target (the gateway's URL) needs --replica_target (host:port of the "
                             "replica behind it) for the direct runs")  # fmt: skip
        return _Targets(opts.replica_target, opts.target), None
    from service.server import MeshServeServer, ServerConfig

    engine, tokenizer = load_model(opts)
    server = MeshServeServer(
        engine,
        tokenizer,
        ServerConfig(
            port=0,
            prefills_per_step=opts.prefills_per_step,
            prefill_token_budget=opts.prefill_token_budget,
            max_waiting=4096,
        ),
    )
    server.start()
    targets = _Targets(f"127.0.0.1:{server.port}", None, server=server)
    try:
        if not server.wait_until_ready(1800):
            raise RuntimeError("in-process server did not finish warm-up")
        if opts.api != "grpc":
            from bench.gateway_load import gateway_for

            targets.gateway = gateway_for(targets.grpc, nodelay=opts.gateway_tcp_nodelay).start()
            targets.http = targets.gateway.base_url
    except BaseException:
        targets.close()
        raise
    return targets, tokenizer


def _load_run(opts: Options, api: str, targets: _Targets, prompt_set: Sequence[Prompt], kind: str, value: float,
              on_done: Callable[[Any], None]) -> Any:  # fmt: skip
    """One timed run of the prompt set at one load over one API (serve_client.LoadResult)."""
    from bench import openai_client, serve_client

    load = {
        "num_requests": opts.num_requests,
        "rate": value if kind == "rate" else None,
        "concurrency": int(value) if kind == "concurrency" else None,
        "burstiness": opts.burstiness,
        "warmup": opts.warmup_requests,
        "seed": opts.seed,
        "on_done": on_done,
    }
    if api == "grpc":
        return serve_client.run_load(targets.grpc, prompt_set, **load)
    return openai_client.run_load(targets.http, prompt_set, api_key=opts.api_key, **load)


def _interleaved_run(opts: Options, targets: _Targets, prompt_set: Sequence[Prompt], rate: float, round_: int,
                     on_done: Callable[[Any], None]) -> list[tuple[str, Any]]:  # fmt: skip
    """One round of `gateway_mix` "interleaved": 2 x num_requests send times at `rate`, alternately a direct gRPC
    request and one through the gateway's OpenAI API (request j of each way sends prompt j; which way takes the
    even times alternates by round), both clients running at once, without warm-up requests (the prefix cache was
    primed). Each LoadResult records the schedule's rate (each way sends at half of it) and seed.
    [(api, LoadResult)] for grpc and openai; a warning if a request went out late (the clients slower to start than
    the schedule's 1 s head start, or the machine too busy to send on time)."""
    from bench import openai_client, serve_client

    n = opts.num_requests
    seed = opts.seed + round_
    times = serve_client.arrival_times(2 * n, rate, opts.burstiness, seed)
    start = time.perf_counter() + 1.0  # both clients connected and waiting by then
    even, odd = ("grpc", "openai") if round_ % 2 == 0 else ("openai", "grpc")
    schedule = {even: serve_client.Schedule(start, times[0::2]), odd: serve_client.Schedule(start, times[1::2])}
    load = {"num_requests": n, "rate": rate, "burstiness": opts.burstiness, "warmup": 0, "seed": seed,
            "on_done": on_done}  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        direct = pool.submit(serve_client.run_load, targets.grpc, prompt_set, schedule=schedule["grpc"], **load)
        gateway = openai_client.run_load(
            targets.http, prompt_set, api_key=opts.api_key, schedule=schedule["openai"], **load
        )
        pairs = [("grpc", direct.result()), ("openai", gateway)]
    for api, result in pairs:
        due = {f"req-{i}": t for i, t in enumerate(schedule[api].times)}
        late = max((r.sent_at - due[r.request_id] for r in result.records if r.request_id in due), default=0.0)
        if late > _LATE_SEND_S:
            log.warning("interleaved round %d: a %s request went out %.0f ms late", round_, api, late * 1e3)
    return pairs


_LATE_SEND_S = 0.05
"""How late an interleaved run's request may go out before the run warns (the send threads' and loop's jitter)."""


def _prime_prefix_cache(target: str, prompt_set: Sequence[Prompt]) -> int:
    """Sends every prompt once for one token, so that every timed run that follows finds the same prompts cached
    (without it, whichever API ran second would find the first one's prompts cached). Returns the failures."""
    from bench import serve_client

    once = [dataclasses.replace(p, max_tokens=1) for p in prompt_set]
    result = serve_client.run_load(
        target, once, num_requests=len(once), concurrency=min(len(once), 16), warmup=0, seed=0
    )
    return sum(not r.ok for r in result.records)


def _run_json(api: str, result: Any, slo: stats.SLO, round_: int | None) -> dict[str, Any]:
    out = {
        "api": api,
        "rate": result.rate,
        "concurrency": result.concurrency,
        "burstiness": result.burstiness,
        "seed": result.seed,
        "summary": stats.serving_summary(result.records, result.duration_s, slo),
        "records": [r.to_json() for r in result.records],
    }
    if round_ is not None:
        out["round"] = round_
    return out


def _p50(records: Sequence[stats.RequestRecord], field: str) -> float:
    return stats.percentile([v for r in records if r.ok and (v := getattr(r, field)) is not None], 50)


def gateway_overhead(results: Sequence[tuple[int, str, Any]]) -> dict[str, Any]:
    """The gateway's cost at one load from the (round, api, LoadResult) runs of `serve --api=both`: TTFT, TPOT and
    e2e p50 each way (pooled over rounds) and their ratios (gateway over direct), the median of the rounds' TTFT
    ratios, and output tokens/s each way (mean over rounds)."""
    by_api: dict[str, list[Any]] = {"grpc": [], "openai": []}
    rounds: dict[int, dict[str, Any]] = {}
    for round_, api, result in results:
        by_api[api].append(result)
        rounds.setdefault(round_, {})[api] = result

    def pooled(api: str, field: str) -> float:
        return _p50([r for res in by_api[api] for r in res.records], field) * 1e3

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    def tokens_per_s(res: Any) -> float:
        ok = [r for r in res.records if r.ok]
        return sum(r.output_tokens for r in ok) / res.duration_s if res.duration_s > 0 else math.nan

    per_round = []
    for i, pair in sorted(rounds.items()):
        ttft = {api: _p50(pair[api].records, "ttft") * 1e3 for api in ("grpc", "openai")}
        per_round.append(
            {
                "round": i,
                "order": [api for r, api, _ in results if r == i],
                "ttft_p50_ms": ttft,
                "ttft_p50_ratio": ratio(ttft["openai"], ttft["grpc"]),
                "output_tokens_per_s": {api: tokens_per_s(pair[api]) for api in ("grpc", "openai")},
            }
        )
    out: dict[str, Any] = {"rounds": per_round}
    for field in ("ttft", "tpot", "e2e"):
        ms = {api: pooled(api, field) for api in ("grpc", "openai")}
        out[f"{field}_p50_ms"] = ms
        out[f"{field}_p50_ratio"] = ratio(ms["openai"], ms["grpc"])
    out["ttft_p50_ratio_median_of_rounds"] = float(np.median([r["ttft_p50_ratio"] for r in per_round]))
    throughput = {api: float(np.mean([tokens_per_s(res) for res in by_api[api]])) for api in ("grpc", "openai")}
    out["output_tokens_per_s"] = throughput
    out["throughput_ratio"] = ratio(throughput["openai"], throughput["grpc"])
    out["failed"] = {api: sum(not r.ok for res in by_api[api] for r in res.records) for api in ("grpc", "openai")}
    out["goal_ttft_ratio"] = GATEWAY_TTFT_GOAL
    out["meets_goal"] = bool(out["ttft_p50_ratio"] <= GATEWAY_TTFT_GOAL)
    return out


def serve(opts: Options) -> dict[str, Any]:
    """W3: the prompt set sent to a server at each request rate (or concurrency); one summary per run. W4 and W5
    (`workload`) run their own clients (bench/multiturn.py) against the same server.

    `api`: "grpc" (MeshServe's API, `target` host:port), "openai" (the gateway's OpenAI HTTP API, streamed; `target`
    its base URL), or "both": the same request set directly over gRPC and through the gateway, on the same server,
    in `gateway_rounds` rounds of the two back to back (the order alternating), after every prompt was sent once so
    both find the same prompts cached; `gateway_overhead` compares them. Without `target` an engine server (and a
    gateway in front of it) is started here."""
    from bench import multiturn, openai_client, serve_client

    multi = opts.workload in multiturn.WORKLOADS
    if opts.api == "both" and multi:
        raise ValueError("--api=both compares the W3 request set; run W4 / W5 with --api=grpc or --api=openai")
    if opts.gateway_rounds < 1:
        raise ValueError(f"--gateway_rounds must be >= 1, got {opts.gateway_rounds}")
    if opts.gateway_mix not in ("rounds", "interleaved"):
        raise ValueError(f"--gateway_mix must be 'rounds' or 'interleaved', got {opts.gateway_mix!r}")
    interleaved = opts.api == "both" and opts.gateway_mix == "interleaved"
    if interleaved and opts.concurrency:
        raise ValueError("--gateway_mix=interleaved shares one arrival schedule: give --request_rates, not concurrency")
    targets, tokenizer = _serve_targets(opts)
    where = opts.target or "in-process"
    try:
        info = serve_client.model_info(targets.grpc) if targets.grpc else {}
        if targets.http:
            info["openai"] = openai_client.model_info(targets.http, opts.api_key)
        if multi:
            target = targets.grpc if opts.api == "grpc" else targets.http
            figures = multiturn.run_workload(
                opts, target, tokenizer, api=opts.api, load_target=targets.grpc, api_key=opts.api_key
            )
            return {**figures, "target": where, "server": info}
        if targets.grpc is None and opts.random_prompt_lens:
            raise ValueError("random token prompts need the gRPC API (the OpenAI API takes text)")
        prompt_set = prompts(opts, int(info.get("vocab_size") or 0))
        loads = [("rate", r) for r in opts.request_rates] if not opts.concurrency else []
        loads += [("concurrency", c) for c in opts.concurrency]
        rounds = opts.gateway_rounds if opts.api == "both" else 1
        per_load = 2 * rounds if opts.api == "both" else 1
        runs, overheads, primed = [], [], None
        if opts.api == "both":
            primed = {"prompts": len(prompt_set), "failed": _prime_prefix_cache(targets.grpc, prompt_set)}
        bar = _bar(opts, len(loads) * opts.num_requests * per_load, "serve")
        for kind, value in loads:
            results = []
            for round_ in range(rounds):
                if interleaved:
                    pairs = _interleaved_run(opts, targets, prompt_set, value, round_, lambda _: bar.update(1))
                else:
                    order = [opts.api] if opts.api != "both" else ["grpc", "openai"][:: 1 if round_ % 2 == 0 else -1]
                    pairs = [
                        (api, _load_run(opts, api, targets, prompt_set, kind, value, lambda _: bar.update(1)))
                        for api in order
                    ]
                for api, result in pairs:
                    results.append((round_, api, result))
                    runs.append(_run_json(api, result, opts.slo, round_ if opts.api == "both" else None))
            if opts.api == "both":
                overheads.append({kind: value, **gateway_overhead(results)})
        bar.close()
    finally:
        targets.close()
    # W3 sends W2's prompts to a server: the same set under either name
    name = workload_name(opts)
    out = {
        "workload": "W3" if name in ("W2", "W3") else name,
        "api": opts.api,
        "target": where,
        "server": info,
        "runs": runs,
    }
    if opts.api == "both":
        out["prefix_cache_primed"] = primed
        out["gateway_mix"] = opts.gateway_mix
        out["gateway_overhead"] = overheads
    return out


# ----- sweep ------------------------------------------------------------------------------------------------------


def recommend_slots(rows: Sequence[dict[str, Any]], min_gain: float, tpot_slo_ms: float | None) -> int | None:
    """The largest slot count that fits, keeps TPOT p90 within the SLO, and pays off: walking up the counts, each
    accepted count raised throughput by at least `min_gain` over the last accepted one. None if none qualifies."""
    best: dict[str, Any] | None = None
    for row in sorted(rows, key=lambda r: r["slots"]):
        if not row.get("fits") or row.get("tokens_per_s") is None:
            continue
        if tpot_slo_ms is not None and not row["tpot_p90_ms"] <= tpot_slo_ms:
            continue
        if best is None or row["tokens_per_s"] >= best["tokens_per_s"] * (1 + min_gain):
            best = row
    return None if best is None else best["slots"]


def recommend_rate(runs: Sequence[dict[str, Any]], min_attainment: float) -> float | None:
    """The highest offered rate whose SLO attainment is at least `min_attainment`."""
    ok = [r["rate"] for r in runs if r["rate"] is not None and r["summary"]["slo_attainment"] >= min_attainment]
    return max(ok) if ok else None


def sweep(opts: Options) -> dict[str, Any]:
    """Offline throughput per slot count (or serving latency per rate) and the recommended slot count (or rate)."""
    if opts.sweep_over == "rates":
        result = serve(opts)
        result["recommended_rate"] = recommend_rate(result["runs"], opts.min_slo_attainment)
        result["rule"] = f"highest rate with SLO attainment >= {opts.min_slo_attainment}"
        return {**result, "sweep_over": "rates"}
    if opts.sweep_over != "slots":
        raise ValueError(f"--sweep_over must be 'slots' or 'rates', got {opts.sweep_over!r}")
    base, tokenizer = load_model(opts, num_slots=min(opts.slot_counts))
    device = limits(opts)
    prompt_set = prompts(opts, base.model_config.vocab_size)
    rows = []
    bar = _bar(opts, len(opts.slot_counts), "sweep")
    for b in sorted(opts.slot_counts):
        try:
            engine, _ = load_model(opts, num_slots=b)
        except CapacityError as exc:
            rows.append({"slots": b, "fits": False, "error": str(exc)})
            bar.update(1)
            continue
        fig = offline_figures(engine, tokenizer, prompt_set, opts)
        rows.append(
            {
                "slots": b,
                "fits": True,
                "tokens_per_s": fig["output_tokens_per_s"],
                "wall_s": fig["wall_s"],
                "tpot_p50_ms": fig["tpot_ms"]["p50"],
                "tpot_p90_ms": fig["tpot_ms"]["p90"],
                "ttft_p50_ms": fig["ttft_ms"]["p50"],
                "failed": len(fig["failed"]),
                "kv_bytes_total": engine.budget.kv_bytes_total,
            }
        )
        bar.update(1)
    bar.close()
    line = roofline_for(base, device)
    mean_context = int(np.mean([len(workloads.encode(p, tokenizer)) + p.max_tokens / 2 for p in prompt_set]))
    for row in rows:
        row["predicted_tokens_per_s"] = line.tokens_per_second(row["slots"], mean_context)
    return {
        "sweep_over": "slots",
        "workload": workload_name(opts),
        "model": model_summary(base),
        "limits": {"bandwidth_gb_s": device.bandwidth / 1e9, "peak_tflop_s": device.peak_flops / 1e12},
        "critical_batch": line.critical_batch,
        "mean_context": mean_context,
        "rows": rows,
        "recommended_slots": recommend_slots(rows, opts.min_gain, opts.slo_tpot_ms),
        "rule": (
            f"largest slot count that fits, keeps TPOT p90 <= {opts.slo_tpot_ms} ms and raises throughput by "
            f">= {opts.min_gain:.0%} over the last accepted count"
        ),
    }


# ----- gateway_auth -----------------------------------------------------------------------------------------------


def gateway_auth(opts: Options) -> dict[str, Any]:
    """The gateway's requests/s with keys and limits checked in its store, in front of a replica that answers at
    once (bench/gateway_load.py)."""
    from bench import gateway_load

    if opts.auth_limits not in ("all", "none"):
        raise ValueError(f"--auth_limits must be 'all' or 'none', got {opts.auth_limits!r}")
    if opts.auth_gate not in ("store", "open"):
        raise ValueError(f"--auth_gate must be 'store' or 'open', got {opts.auth_gate!r}")
    return gateway_load.gateway_auth(
        duration_s=opts.auth_duration_s,
        connections=opts.auth_connections,
        limits=None if opts.auth_limits == "all" else {},
        profiler=opts.gateway_profile,
        py_spy=opts.py_spy,
        loop=opts.gateway_loop,
        extra_path=opts.gateway_pythonpath,
        gate=opts.auth_gate,
        nodelay=opts.gateway_tcp_nodelay,
    )


# ----- quality ----------------------------------------------------------------------------------------------------


def quality_figures(opts: Options) -> dict[str, Any]:
    """bench.quality's figures for int8 weights, an int8 KV cache and both against the engine in `opts.dtype` (same
    checkpoint, same run): the README's quality table."""
    base = dataclasses.replace(opts, quantize="none", kv_dtype="auto")
    reference, tokenizer = load_model(base, 1)
    config = engine_config(base, 1)
    engines = {opts.dtype: reference} | {
        name: Engine(reference.model_config, reference.params, dataclasses.replace(config, **change))
        for name, change in quality.FORMATS.items()
    }
    window = min(1024, reference.model_config.max_position_embeddings)
    results = quality.evaluate(engines, tokenizer, window=window, stride=window // 2)
    return {
        "model": model_summary(reference),
        "corpus": os.path.relpath(quality.CORPUS, os.path.dirname(os.path.dirname(__file__))),
        "window": window,
        "rows": [dataclasses.asdict(q) | {"perplexity_rise": q.perplexity_ratio(results[0]) - 1} for q in results],
        "table": quality.table(results),
    }


COMMANDS: dict[str, Callable[[Options], dict[str, Any]]] = {
    "roofline": roofline,
    "latency": latency,
    "throughput": throughput,
    "serve": serve,
    "sweep": sweep,
    "gateway_auth": gateway_auth,
    "profile": step_profile.profile,
    "quality": quality_figures,
}


# ----- results ----------------------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    """Strict JSON: nan becomes null and an infinite float the string "inf" (a rate of inf means all at once)."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


def _redacted(secret: str | None) -> str | None:
    return None if not secret else "<redacted>"


def _roofline_from(result: dict[str, Any]) -> rl.Roofline:
    m, lim = result["model"], result["limits"]
    device = rl.DeviceSpec("this device", lim["bandwidth_gb_s"] * 1e9, lim["peak_tflop_s"] * 1e12)
    return rl.Roofline(m["n_params"], m["weight_bytes"], m["kv_bytes_per_token"], device)


def plot(command: str, result: dict[str, Any], stem: str) -> list[str]:
    """Draws the command's plots beside the JSON (`stem` + suffix + .png); returns their paths."""
    from bench import plots

    name = result.get("model", {}).get("name", "")
    if command == "roofline":
        return [
            plots.roofline_table(dev["table"], f"{stem}-{key}.png", title=f"{name} decode roofline: {dev['device']}")
            for key, dev in result["devices"].items()
        ]
    if command == "latency":
        rows = [r for r in result["decode"] if "error" not in r]
        context = result["w1"]["prompt_tokens"] + result["w1"]["output_tokens"] // 2
        return [
            plots.throughput_vs_slots(
                rows, _roofline_from(result), context, f"{stem}-decode.png", title=f"{name} decode tokens/s (W1 prompt)"
            )
        ]
    if command in ("serve", "sweep") and result.get("runs"):
        apis = sorted({r.get("api", "grpc") for r in result["runs"]})
        return [
            plots.latency_vs_rate(
                [r for r in result["runs"] if r.get("api", "grpc") == api and not r.get("round")],
                f"{stem}-latency{'' if len(apis) == 1 else '-' + api}.png",
                title=f"W3 latency vs load ({name}{'' if api == 'grpc' else ', ' + api})",
            )
            for api in apis
        ]
    if command == "sweep":
        return [
            plots.throughput_vs_slots(
                [r for r in result["rows"] if r.get("fits")],
                _roofline_from(result),
                result["mean_context"],
                f"{stem}-slots.png",
                title=f"{name} offline throughput vs slots",
                recommended=result["recommended_slots"],
            )
        ]
    return []


def run_command(
    command: str,
    opts: Options,
    output_dir: str,
    *,
    flags: dict[str, Any] | None = None,
    draw: bool = True,
) -> tuple[dict[str, Any], str, list[str]]:
    """Runs one command and writes `<output_dir>/<command>-<timestamp>.json` (machine, versions, options, flags,
    figures) and its plots. Returns the written document, the JSON path and the plot paths."""
    import json

    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    started = time.time()
    figures = COMMANDS[command](opts)
    os.makedirs(output_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    stem = os.path.join(output_dir, f"{command}-{stamp}")
    pngs = plot(command, figures, stem) if draw else []
    doc = _json_safe(
        {
            "command": command,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "elapsed_s": time.time() - started,
            "machine": machine(),
            "options": {**dataclasses.asdict(opts), "api_key": _redacted(opts.api_key)},
            "flags": {k: _redacted(v) if k == "api_key" else v for k, v in (flags or {}).items()},
            "figures": figures,
            "plots": [os.path.basename(p) for p in pngs],
        }
    )
    path = stem + ".json"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
    return doc, path, pngs
