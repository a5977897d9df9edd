"""Roofline-aware benchmarks of meshserve: the limits, W1 latency, W2 throughput (vs HF), W3 serving, slot sweeps.

    python scripts/benchmark.py roofline --device_spec=tpu_v5e,h100          # limits here + predictions there
    python scripts/benchmark.py latency --slot_counts=1,8,32                 # W1: TTFT, decode tok/s, MBU, MFU
    python scripts/benchmark.py throughput --baseline=hf                     # W2 vs HF transformers generate
    python scripts/benchmark.py serve --target=127.0.0.1:50051 --request_rates=2,8 --slo_ttft_ms=500
    python scripts/benchmark.py serve --workload=w4 --users=16 --turns=8       # W4 multi-turn chat: reuse vs ideal
    python scripts/benchmark.py serve --workload=w5 --max_tokens=256           # W5: a 6,000-token prompt mid-decode
    python scripts/benchmark.py sweep --slot_counts=8,16,32,64 --slo_tpot_ms=200
    python scripts/benchmark.py serve --api=openai --workload=w4               # through the gateway's OpenAI API
    python scripts/benchmark.py serve --api=both --request_rates=1 --gateway_rounds=3   # gateway TTFT / direct
    python scripts/benchmark.py gateway_auth --auth_duration_s=10              # requests/s with keys + limits
    python scripts/benchmark.py quality                                        # int8 weights vs float32: perplexity
    python scripts/benchmark.py latency --quantize=int8 --slot_counts=1        # W1 with int8 weights
    python scripts/benchmark.py latency --slot_counts=1 --also_quantize=int8 --llamacpp=f32,f16,shipped   # vs llama.cpp
    python scripts/benchmark.py profile --num_slots=16 --max_seq_len=2048 --contexts=512,1536   # step times: fleet sim

Every run writes <output_dir>/<command>-<time>.json (machine, versions, flags, figures) and its PNG plots, and
prints the headline figures. Prompts: the synthetic --workload (w1, w2, w3), a --prompts_file JSONL, or random token
prompts of --random_prompt_lens; `serve` also runs the W4 and W5 workloads (bench/multiturn.py). Formulas and
workload definitions: shared/PERFORMANCE.md; the logic lives in `bench/` (importable, tested on the tiny model).

`serve --api` picks the client: grpc (MeshServe's API), openai (the gateway's OpenAI HTTP API, streamed with usage;
bench/openai_client.py; W3 and W4), or both: the W3 request set directly and through the gateway on the same server
(`gateway_overhead`: TTFT p50 via gateway / direct, goal <= 1.05x, and throughput both ways). `gateway_auth` drives a
gateway with the real StoreGate (keys, every limit) in front of an instant stub replica (bench/gateway_load.py).

`--llamacpp=f32,f16,q8_0,shipped` adds llama.cpp rows to latency (W1) and throughput (W2) in the same run: GGUFs of
the same weights (bench/llamacpp_baseline.py), the same prompt ids, run in llama.cpp's own venv
(scripts/install_llamacpp.sh) as a subprocess, with meshserve / llama.cpp ratios. `--also_quantize=int8` runs
meshserve again with int8 weights in the same run (one JSON per format, each with the llama.cpp rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import statistics
import sys

# Run as a plain script, Python puts scripts/ on the path, not the repository root that holds the packages.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from bench import gateway_load, llamacpp_baseline, multiturn, workloads
from bench import roofline as rl
from bench.runner import COMMANDS, Options, decode_pass, load_model, prompts, run_command
from checkpoints.errors import CheckpointError
from engine.engine import default_dtype

_CHECKPOINT = flags.DEFINE_string("checkpoint", "bundled", "'bundled' (SmolLM2-135M), orbax dir, .gguf or HF folder.")
_RANDOM_MODEL = flags.DEFINE_enum("random_model", None, ["tiny", "1b"], "Random weights of this config instead.")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "auto: float32 on CPU, else bf16.")
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 64, "Slots of the throughput / serve engine.")
_SLOT_COUNTS = flags.DEFINE_list("slot_counts", ["1", "4", "16", "64"], "Slot counts: latency, roofline, sweep.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 512, "Context per slot (prompt + output).")
_MAX_PREFILL_LEN = flags.DEFINE_integer("max_prefill_len", 256, "Largest prefill call; longer prompts run in chunks.")
_FINE_PREFILL_BUCKETS = flags.DEFINE_bool(
    "fine_prefill_buckets", True, "Prefill buckets at powers of two and 1.5x them (EngineConfig.fine_prefill_buckets)."
)
_PAGE_SIZE = flags.DEFINE_integer("page_size", 64, "KV cache page length.")
_DECODE_STEPS = flags.DEFINE_integer("decode_steps", 8, "Decode steps per dispatch.")
_PREFILLS_PER_STEP = flags.DEFINE_integer("prefills_per_step", 64, "Most prompts admitted between two dispatches.")
_PREFILL_TOKEN_BUDGET = flags.DEFINE_integer(
    "prefill_token_budget", 256, "Serve: most prompt tokens read between two dispatches while requests decode (0: all)."
)
_PREFILL_SEGMENTS = flags.DEFINE_integer(
    "prefill_segments", 32, "Most prompts packed into one prefill call (one per 8 of its tokens at most)."
)
_PREFIX_CACHING = flags.DEFINE_bool(
    "prefix_caching", True, "Reuse cached KV pages of matching prompt openings; every timed run starts with none."
)
_KV_PAGES = flags.DEFINE_integer("kv_pages", None, "KV pool pages (default: num_slots * max_seq_len / page_size).")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "auto", ["auto", "int8"], "KV cache format (int8: values + bf16 scales).")
_ADMISSION = flags.DEFINE_enum("admission", "reserve", ["reserve", "grow"], "KV admission policy (see serve.py).")
_HOST_KV_BYTES = flags.DEFINE_integer("host_kv_bytes", 0, "Host RAM for the KV host tier, bytes (0: none).")
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "kernel", "pallas", "xla"], "Decode attention implementation."
)
_LINEAR = flags.DEFINE_enum("linear", "auto", ["auto", "kernel", "xla"], "Weight products implementation.")
_HUGE_PAGES = flags.DEFINE_bool("huge_pages", True, "CPU: weights in 2 MiB pages (EngineConfig.huge_pages).")
_QUANTIZE = flags.DEFINE_enum("quantize", "none", ["none", "int8"], "Weight format (int8: weight-only, at load).")
_WORKLOAD = flags.DEFINE_enum(
    "workload", "w2", ["w1", "w2", "w3", "w4", "w5"], "Synthetic workload (shared/PERFORMANCE.md); w4, w5: serve only."
)
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL prompts: messages | prompt | text | token_ids.")
_RANDOM_PROMPT_LENS = flags.DEFINE_list("random_prompt_lens", [], "Random token prompts of these lengths.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", None, "First n prompts of the set (random: n per length).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Tokens generated per prompt, exactly (EOS ignored).")
_TTFT_PROMPT_LENS = flags.DEFINE_list("ttft_prompt_lens", ["16", "64", "256"], "Latency: random prompt lengths.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions; figures are medians.")
_DEVICE_SPEC = flags.DEFINE_list("device_spec", [], "Roofline presets: tpu_v5e, tpu_v6e, h100, h200.")
_CHIPS = flags.DEFINE_integer("chips", 1, "Roofline: chips the model is sharded over.")
_CONTEXTS = flags.DEFINE_list("contexts", ["256", "1024", "4096"], "Roofline: context lengths.")
_BANDWIDTH_MB = flags.DEFINE_integer("bandwidth_mb", 512, "Size of the bandwidth-measuring array, MiB.")
_MATMUL_N = flags.DEFINE_integer("matmul_n", 2048, "Side of the FLOP/s-measuring square matmul.")
_BASELINE = flags.DEFINE_enum("baseline", None, ["hf"], "Throughput: also run HF transformers generate.")
_HF_BATCH_SIZES = flags.DEFINE_list("hf_batch_sizes", ["8", "16", "32", "64"], "HF static batch sizes (best wins).")
_TARGET = flags.DEFINE_string(
    "target",
    None,
    "Serve: host:port of a running server, or the gateway's base URL with --api=openai|both "
    "(default: start a server, and a gateway in front of it, here).",
)
_API = flags.DEFINE_enum(
    "api",
    "grpc",
    ["grpc", "openai", "both"],
    "Serve: MeshServe's gRPC API, the gateway's OpenAI HTTP API "
    "(streamed), or both: the W3 requests directly and through the gateway, on one server (the gateway's overhead).",
)
_REPLICA_TARGET = flags.DEFINE_string(
    "replica_target",
    None,
    "Serve with an OpenAI --target: host:port of the gRPC API behind it (the direct runs of "
    "--api=both; GetLoad polls in W4).",
)
_API_KEY = flags.DEFINE_string(
    "api_key",
    os.environ.get("MESHSERVE_API_KEY"),
    "Serve over OpenAI: the API key (default $MESHSERVE_API_KEY); never written to the results.",
)
_GATEWAY_ROUNDS = flags.DEFINE_integer(
    "gateway_rounds", 1, "Serve --api=both: rounds of (direct, gateway) runs, the order alternating."
)
_GATEWAY_MIX = flags.DEFINE_enum(
    "gateway_mix",
    "rounds",
    ["rounds", "interleaved"],
    "Serve --api=both: each round a direct run and a gateway run one after the other (rounds), or one arrival "
    "schedule at the rate whose requests go alternately direct and through the gateway (interleaved: both meet the "
    "same load, the gateway's own CPU included).",
)
_GATEWAY_TCP_NODELAY = flags.DEFINE_bool(
    "gateway_tcp_nodelay",
    False,
    "Experiment: TCP_NODELAY on the gateway's listening socket (serve in-process, gateway_auth).",
)
_AUTH_DURATION_S = flags.DEFINE_float("auth_duration_s", 10.0, "gateway_auth: seconds of timed load.")
_AUTH_CONNECTIONS = flags.DEFINE_integer("auth_connections", 8, "gateway_auth: client connections kept busy.")
_AUTH_LIMITS = flags.DEFINE_enum(
    "auth_limits", "all", ["all", "none"], "gateway_auth: the user's limits: all five, set too high to trip, or none."
)
_AUTH_GATE = flags.DEFINE_enum(
    "auth_gate", "store", ["store", "open"], "gateway_auth: StoreGate (keys required) or OpenGate (no store)."
)
_GATEWAY_PROFILE = flags.DEFINE_enum(
    "gateway_profile", None, ["py-spy", "cprofile"], "gateway_auth: profile the gateway process."
)
_PY_SPY = flags.DEFINE_string("py_spy", None, "gateway_auth: the py-spy binary (default: on PATH).")
_GATEWAY_LOOP = flags.DEFINE_enum(
    "gateway_loop", "asyncio", ["asyncio", "uvloop"], "gateway_auth: the gateway process's event loop."
)
_GATEWAY_PYTHONPATH = flags.DEFINE_list(
    "gateway_pythonpath", [], "gateway_auth: folders first on the gateway process's path (e.g. holding httptools)."
)
_REQUEST_RATES = flags.DEFINE_list("request_rates", ["1", "inf"], "Serve: requests/s ('inf': all at once).")
_CONCURRENCY = flags.DEFINE_list("concurrency", [], "Serve: fixed concurrencies instead of rates.")
_BURSTINESS = flags.DEFINE_float("burstiness", 1.0, "Gamma shape of arrival gaps: 1 Poisson, <1 burstier.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 64, "Serve: timed requests per rate.")
_WARMUP_REQUESTS = flags.DEFINE_integer("warmup_requests", 2, "Serve: untimed requests before each rate.")
_USERS = flags.DEFINE_integer("users", 16, "Serve W4: chat users, one conversation each.")
_TURNS = flags.DEFINE_integer("turns", 8, "Serve W4: turns per conversation.")
_W4_STAGGER_S = flags.DEFINE_float("w4_stagger_s", 0.5, "Serve W4: seconds between two users' first turns.")
_LONG_PROMPT_TOKENS = flags.DEFINE_integer("long_prompt_tokens", 6000, "Serve W5: tokens of the long prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of arrivals, sampling and random prompts (recorded).")
_SLO_TTFT_MS = flags.DEFINE_float("slo_ttft_ms", None, "Goodput SLO on TTFT, ms.")
_SLO_TPOT_MS = flags.DEFINE_float("slo_tpot_ms", None, "Goodput SLO on TPOT, ms (sweep: the TPOT limit).")
_SLO_E2E_MS = flags.DEFINE_float("slo_e2e_ms", None, "Goodput SLO on end-to-end latency, ms.")
_SWEEP_OVER = flags.DEFINE_enum("sweep_over", "slots", ["slots", "rates"], "Sweep: slot counts or request rates.")
_MIN_GAIN = flags.DEFINE_float("min_gain", 0.05, "Sweep: least throughput gain that justifies more slots.")
_MIN_SLO_ATTAINMENT = flags.DEFINE_float("min_slo_attainment", 0.9, "Sweep over rates: share meeting the SLOs.")
_ALSO_QUANTIZE = flags.DEFINE_list(
    "also_quantize", [], "Latency / throughput: run meshserve again with these weight formats (int8) in the same run."
)
_LLAMACPP = flags.DEFINE_list(
    "llamacpp",
    [],
    "Latency / throughput: llama.cpp rows in the same run, on GGUFs of the same weights: "
    f"{', '.join(llamacpp_baseline.VARIANTS)} (bench/llamacpp_baseline.py).",
)
_LLAMACPP_VENV = flags.DEFINE_string(
    "llamacpp_venv", None, "llama.cpp's venv (default $LLAMACPP_VENV or .venv-llamacpp; scripts/install_llamacpp.sh)."
)
_LLAMACPP_THREADS = flags.DEFINE_integer(
    "llamacpp_threads", None, "llama.cpp threads (default: the cores this process may run on, as XLA uses)."
)
_LLAMACPP_KV = flags.DEFINE_enum("llamacpp_kv", "f16", ["f16", "f32"], "llama.cpp's KV cache type (its default f16).")
_LLAMACPP_FLASH_ATTN = flags.DEFINE_enum(
    "llamacpp_flash_attn", "auto", list(llamacpp_baseline.FLASH_ATTN), "llama.cpp's flash attention (its default)."
)
_LLAMACPP_ROUNDS = flags.DEFINE_integer(
    "llamacpp_rounds",
    8,
    "latency --llamacpp: rounds of one meshserve W1 decode pass per format and one llama.cpp pass per variant, "
    "alternating (order reversed every other round), with the median of the per-round ratios: a VM's bandwidth "
    "drifts too much between runs taken one after the other. 0: none.",
)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "bench_results", "Where JSON results and plots go.")
_PLOT = flags.DEFINE_bool("plot", True, "Draw PNG plots.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars on stderr.")


def _ints(values: list[str], name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} must be comma-separated integers, got {','.join(values)}") from None


def _floats(values: list[str], name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name} must be comma-separated numbers, got {','.join(values)}") from None


def options() -> Options:
    """The flags as benchmark Options (the one place flags meet the bench package)."""
    rates = _floats(_REQUEST_RATES.value, "request_rates")
    if any(r <= 0 or math.isnan(r) for r in rates):
        raise app.UsageError("--request_rates must be > 0 ('inf' sends everything at once)")
    return Options(
        checkpoint=None if _CHECKPOINT.value == "bundled" else _CHECKPOINT.value,
        random_model=_RANDOM_MODEL.value,
        dtype=default_dtype() if _DTYPE.value == "auto" else _DTYPE.value,
        num_slots=_NUM_SLOTS.value,
        slot_counts=_ints(_SLOT_COUNTS.value, "slot_counts"),
        max_seq_len=_MAX_SEQ_LEN.value,
        max_prefill_len=_MAX_PREFILL_LEN.value,
        fine_prefill_buckets=_FINE_PREFILL_BUCKETS.value,
        page_size=_PAGE_SIZE.value,
        decode_steps=_DECODE_STEPS.value,
        prefills_per_step=_PREFILLS_PER_STEP.value,
        prefill_token_budget=_PREFILL_TOKEN_BUDGET.value or None,
        prefill_segments=_PREFILL_SEGMENTS.value,
        prefix_caching=_PREFIX_CACHING.value,
        kv_pages=_KV_PAGES.value,
        kv_dtype=_KV_DTYPE.value,
        admission=_ADMISSION.value,
        host_kv_bytes=_HOST_KV_BYTES.value,
        attention=_ATTENTION.value,
        linear=_LINEAR.value,
        huge_pages=_HUGE_PAGES.value,
        quantize=_QUANTIZE.value,
        workload=_WORKLOAD.value,
        prompts_file=_PROMPTS_FILE.value,
        random_prompt_lens=_ints(_RANDOM_PROMPT_LENS.value, "random_prompt_lens"),
        num_prompts=_NUM_PROMPTS.value,
        max_tokens=_MAX_TOKENS.value,
        ttft_prompt_lens=_ints(_TTFT_PROMPT_LENS.value, "ttft_prompt_lens"),
        repeats=_REPEATS.value,
        device_spec=tuple(_DEVICE_SPEC.value),
        chips=_CHIPS.value,
        contexts=_ints(_CONTEXTS.value, "contexts"),
        bandwidth_mb=_BANDWIDTH_MB.value,
        matmul_n=_MATMUL_N.value,
        baseline=_BASELINE.value,
        hf_batch_sizes=_ints(_HF_BATCH_SIZES.value, "hf_batch_sizes"),
        target=_TARGET.value,
        api=_API.value,
        replica_target=_REPLICA_TARGET.value,
        api_key=_API_KEY.value or None,
        gateway_rounds=_GATEWAY_ROUNDS.value,
        gateway_mix=_GATEWAY_MIX.value,
        gateway_tcp_nodelay=_GATEWAY_TCP_NODELAY.value,
        auth_duration_s=_AUTH_DURATION_S.value,
        auth_connections=_AUTH_CONNECTIONS.value,
        auth_limits=_AUTH_LIMITS.value,
        auth_gate=_AUTH_GATE.value,
        gateway_profile=_GATEWAY_PROFILE.value,
        py_spy=_PY_SPY.value,
        gateway_loop=_GATEWAY_LOOP.value,
        gateway_pythonpath=tuple(_GATEWAY_PYTHONPATH.value),
        request_rates=rates,
        concurrency=_ints(_CONCURRENCY.value, "concurrency"),
        burstiness=_BURSTINESS.value,
        num_requests=_NUM_REQUESTS.value,
        warmup_requests=_WARMUP_REQUESTS.value,
        users=_USERS.value,
        turns=_TURNS.value,
        w4_stagger_s=_W4_STAGGER_S.value,
        long_prompt_tokens=_LONG_PROMPT_TOKENS.value,
        seed=_SEED.value,
        slo_ttft_ms=_SLO_TTFT_MS.value,
        slo_tpot_ms=_SLO_TPOT_MS.value,
        slo_e2e_ms=_SLO_E2E_MS.value,
        sweep_over=_SWEEP_OVER.value,
        min_gain=_MIN_GAIN.value,
        min_slo_attainment=_MIN_SLO_ATTAINMENT.value,
        progress=_PROGRESS.value,
    )


def _f(value, spec: str = ".1f") -> str:
    """A figure for people: JSON nulls (nan) and strings ("inf") print as they are, numbers with `spec`."""
    if value is None:
        return "n/a"
    return value if isinstance(value, str) else format(value, spec)


def headline(command: str, figures: dict) -> list[str]:
    """The few lines a person reads first (from the JSON-safe figures: nan is None there)."""
    lines = []
    if command == "roofline":
        for key, d in figures["devices"].items():
            lines.append(
                f"{key} ({d['device']}): {_f(d['bandwidth_gb_s'])} GB/s, {_f(d['peak_tflop_s'], '.2f')} TFLOP/s, "
                f"weights {d['weight_bytes'] / 2**20:.1f} MiB, KV {d['kv_bytes_per_token'] / 1024:.1f} KiB/token, "
                f"critical batch {_f(d['critical_batch'])}"
            )
            for row in d["table"]:
                lines.append(
                    f"  slots {row['slots']:>4} context {row['context']:>6}: step {_f(row['step_ms'], '.3f')} ms, "
                    f"{_f(row['tokens_per_s'])} tok/s ({row['bound']} bound)"
                )
    elif command == "latency":
        w1 = figures["w1"]
        lines.append(
            f"{figures['workload']}: TTFT {_f(w1['ttft_ms'])} ms, decode {_f(w1['decode_tokens_per_s'])} tok/s, "
            f"MBU {_f(w1['mbu'], '.1%')}"
        )
        for r in figures["decode"]:
            if "error" in r:
                lines.append(f"  slots {r['slots']:>4}: {r['error']}")
                continue
            lines.append(
                f"  slots {r['slots']:>4}: {_f(r['tokens_per_s'])} tok/s, step {_f(r['step_ms'], '.2f')} ms, "
                f"MBU {_f(r['mbu'], '.1%')}, MFU {_f(r['mfu'], '.1%')} "
                f"(roofline {_f(r['predicted_tokens_per_s'], '.0f')} tok/s)"
            )
        for r in figures["ttft"]:
            lines.append(
                f"  TTFT {r['prompt']} ({r['prompt_tokens']} tokens): {_f(r['ttft_ms'])} ms, "
                f"prefill MFU {_f(r['prefill_mfu'], '.1%')}"
            )
    elif command == "throughput":
        m = figures["meshserve"]
        lines.append(f"{figures['workload']}: {_f(m['output_tokens_per_s'])} tok/s, wall {_f(m['wall_s'], '.2f')} s")
        if "hf" in figures:
            h = figures["hf"]
            lines.append(
                f"HF generate: {_f(h['output_tokens_per_s'])} tok/s (batch {h['best_batch_size']}); "
                f"meshserve / HF = {_f(figures['speedup_vs_hf'], '.2f')}x"
            )
    elif command == "sweep" and figures.get("sweep_over") == "slots":
        for r in figures["rows"]:
            fits = "" if r["fits"] else " (does not fit)"
            lines.append(f"  slots {r['slots']:>4}: {_f(r.get('tokens_per_s'))} tok/s{fits}")
        lines.append(f"recommended slots: {figures['recommended_slots']} ({figures['rule']})")
    if "llamacpp" in figures:
        lines += llamacpp_headline(command, figures)
    if command == "serve":
        lines += multiturn.headline(figures)
    if command == "quality":
        lines.append(figures["table"])
    if command == "gateway_auth":
        lines += gateway_load.headline(figures)
    if command in ("serve", "sweep") and figures.get("runs"):
        for run in figures["runs"]:
            s = run["summary"]
            load = f"rate {run['rate']}" if run["rate"] is not None else f"concurrency {run['concurrency']}"
            api = "" if run.get("api", "grpc") == "grpc" else f"[{run['api']}] "
            if "round" in run:
                api = f"[{run['api']}, round {run['round']}] "
            lines.append(
                f"  {api}{load}: {s['completed']}/{s['requests']} ok, {_f(s['output_tokens_per_s'])} tok/s, "
                f"TTFT p50 {_f(s['ttft_ms']['p50'])} ms, TPOT p50 {_f(s['tpot_ms']['p50'])} ms, "
                f"goodput {_f(s['goodput_requests_per_s'], '.2f')} req/s"
            )
        for o in figures.get("gateway_overhead", []):
            load = f"rate {o['rate']}" if "rate" in o else f"concurrency {o['concurrency']}"
            ttft, tok = o["ttft_p50_ms"], o["output_tokens_per_s"]
            lines.append(
                f"gateway overhead ({figures.get('gateway_mix', 'rounds')}) at {load}: "
                f"TTFT p50 {_f(ttft['openai'])} ms via gateway / {_f(ttft['grpc'])} ms "
                f"direct = {_f(o['ttft_p50_ratio'], '.3f')}x (goal <= {o['goal_ttft_ratio']}x: "
                f"{'met' if o['meets_goal'] else 'NOT met'}; median of {len(o['rounds'])} rounds "
                f"{_f(o['ttft_p50_ratio_median_of_rounds'], '.3f')}x); TPOT p50 {_f(o['tpot_p50_ratio'], '.3f')}x; "
                f"output {_f(tok['openai'])} / {_f(tok['grpc'])} tok/s = {_f(o['throughput_ratio'], '.3f')}x"
            )
        if "recommended_rate" in figures:
            lines.append(f"recommended rate: {figures['recommended_rate']} ({figures['rule']})")
    return lines


def llamacpp_headline(command: str, figures: dict) -> list[str]:
    """One line per llama.cpp row: its figures and meshserve's over them (above 1: meshserve ahead)."""
    lc = figures["llamacpp"]
    lines = []
    for row, ratio in zip(lc["rows"], figures["vs_llamacpp"], strict=True):
        load = "/".join(f"{x:.1f}" for x in row["load_average_1m"])
        name = f"llama.cpp {row['variant']} ({'/'.join(row['tensor_types'])}, {lc['threads']} threads, load {load})"
        if command == "latency":
            lines.append(
                f"{name}: TTFT {_f(row['ttft_ms'])} ms, decode {_f(row['decode_tokens_per_s'])} tok/s, "
                f"MBU {_f(row['mbu'], '.1%')}; meshserve / llama.cpp decode = "
                f"{_f(ratio['decode_tokens_per_s'], '.2f')}x"
            )
        else:
            lines.append(
                f"{name}: {_f(row['output_tokens_per_s'])} tok/s, wall {_f(row['wall_s'], '.2f')} s (prefill "
                f"{_f(row['prefill_s'], '.2f')} s), decode MBU {_f(row['mbu'], '.1%')}; meshserve / llama.cpp = "
                f"{_f(ratio['output_tokens_per_s'], '.2f')}x"
            )
    return lines


def llamacpp_prepare(command: str, opts: Options) -> dict | None:
    """Checks the --llamacpp request before anything is timed, writes its GGUFs (once, cached) and encodes the
    prompts meshserve will read; None without --llamacpp. Exits with one line when the llama.cpp venv is missing."""
    variants = list(dict.fromkeys(_LLAMACPP.value))
    if not variants:
        return None
    if command not in ("latency", "throughput"):
        raise app.UsageError("--llamacpp adds rows to latency (W1) and throughput (W2) only")
    unknown = [v for v in variants if v not in llamacpp_baseline.VARIANTS]
    if unknown:
        raise app.UsageError(
            f"--llamacpp: unknown {', '.join(unknown)}; choose from {', '.join(llamacpp_baseline.VARIANTS)}"
        )
    try:
        python = llamacpp_baseline.venv_python(_LLAMACPP_VENV.value or llamacpp_baseline.default_venv())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    if opts.random_model:
        raise ValueError("--llamacpp compares the same weights: it needs a GGUF checkpoint, not --random_model")
    source = llamacpp_baseline.source_gguf(opts.checkpoint)
    for variant in variants:
        llamacpp_baseline.comparison_gguf(source, variant)
    # the engine the command loads first (kept for it), so its tokenizer encodes the very ids meshserve reads
    engine, tokenizer = load_model(opts, num_slots=min(opts.slot_counts) if command == "latency" else None)
    ids = [workloads.encode(p, tokenizer) for p in prompts(opts, engine.model_config.vocab_size)]
    threads = _LLAMACPP_THREADS.value or len(os.sched_getaffinity(0))
    return {"python": python, "source": source, "variants": variants, "ids": ids, "threads": threads}


def llamacpp_figures(command: str, opts: Options, plan: dict, figures: dict) -> dict:
    """The llama.cpp rows, timed now; MBU over the bandwidth meshserve's run measured (latency) or measured here."""
    if "limits" in figures:
        bandwidth = figures["limits"]["bandwidth_gb_s"] * 1e9
    else:
        bandwidth = rl.measure_bandwidth(opts.dtype, opts.bandwidth_mb)
    return llamacpp_baseline.compare(
        plan["python"],
        plan["source"],
        plan["variants"],
        "w1" if command == "latency" else "w2",
        plan["ids"],
        max_tokens=opts.max_tokens,
        repeats=opts.repeats,
        threads=plan["threads"],
        kv_type=_LLAMACPP_KV.value,
        flash_attn=_LLAMACPP_FLASH_ATTN.value,
        bandwidth=bandwidth,
    )


def llamacpp_rounds(opts: Options, plan: dict, formats: list[str], rounds: int) -> dict:
    """W1 decode of meshserve (one engine of one slot per weight format) and llama.cpp (one process per variant,
    `llamacpp_baseline.W1Session`) in alternating rounds: tokens/s per pass, and per pair the median over rounds of
    meshserve's over llama.cpp's (above 1: meshserve ahead)."""
    ids = plan["ids"][0]
    engines = {q: load_model(dataclasses.replace(opts, quantize=q), num_slots=1)[0] for q in formats}
    threads = plan["threads"]
    passes: list[dict[str, float]] = []
    with contextlib.ExitStack() as stack:
        sessions = {
            v: stack.enter_context(
                llamacpp_baseline.W1Session(
                    plan["python"],
                    llamacpp_baseline.make_spec(
                        plan["source"],
                        v,
                        "w1",
                        [ids],
                        opts.max_tokens,
                        1,
                        threads,
                        _LLAMACPP_KV.value,
                        _LLAMACPP_FLASH_ATTN.value,
                    )[0],
                )
            )
            for v in plan["variants"]
        }
        for q in formats:  # warm-up, excluded (llama.cpp's ran when its process started)
            decode_pass(engines[q], ids, opts.max_tokens)
        for r in range(rounds):
            order = [("meshserve", q) for q in formats] + [("llama.cpp", v) for v in plan["variants"]]
            row = {}
            for who, name in order[:: -1 if r % 2 else 1]:
                if who == "meshserve":
                    p = decode_pass(engines[name], ids, opts.max_tokens)
                    row[f"meshserve {name}"] = p.tokens / p.seconds
                else:
                    row[f"llama.cpp {name}"] = sessions[name].run()["decode_tokens_per_s"]
            passes.append(row)
    ratios = []
    for q in formats:
        for v in plan["variants"]:
            per_round = [r[f"meshserve {q}"] / r[f"llama.cpp {v}"] for r in passes]
            ratios.append(
                {"meshserve": q, "variant": v, "median_ratio": statistics.median(per_round), "ratios": per_round}
            )
    return {"rounds": rounds, "threads": threads, "decode_tokens_per_s": passes, "ratios": ratios}


def llamacpp_rounds_headline(paired: dict) -> list[str]:
    lines = []
    for name in paired["decode_tokens_per_s"][0]:
        runs = [r[name] for r in paired["decode_tokens_per_s"]]
        lines.append(
            f"alternating rounds, {name}: median {statistics.median(runs):.1f} tok/s ({min(runs):.1f}-{max(runs):.1f})"
        )
    for r in paired["ratios"]:
        lines.append(
            f"alternating rounds, meshserve {r['meshserve']} / llama.cpp {r['variant']} decode: median "
            f"{r['median_ratio']:.3f}x over {paired['rounds']} rounds ({min(r['ratios']):.2f}-{max(r['ratios']):.2f})"
        )
    return lines


def with_llamacpp(command: str, figures: dict, llamacpp: dict) -> dict:
    """`figures` with the llama.cpp rows and, per row, meshserve's figure over llama.cpp's (above 1: ahead)."""

    def ratio(ours: float | None, theirs: float | None) -> float | None:
        return ours / theirs if ours and theirs else None

    if command == "latency":
        ours = figures["w1"]
        vs = [
            {
                "variant": r["variant"],
                "decode_tokens_per_s": ratio(ours["decode_tokens_per_s"], r["decode_tokens_per_s"]),
                "ttft_speedup": ratio(r["ttft_ms"], ours["ttft_ms"]),
            }
            for r in llamacpp["rows"]
        ]
    else:
        ours = figures["meshserve"]
        vs = [
            {
                "variant": r["variant"],
                "output_tokens_per_s": ratio(ours["output_tokens_per_s"], r["output_tokens_per_s"]),
            }
            for r in llamacpp["rows"]
        ]
    return {**figures, "llamacpp": llamacpp, "vs_llamacpp": vs}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: benchmark.py {{{'|'.join(COMMANDS)}}} [--flags]")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = argv[1]
    opts = options()
    given = {name: flags.FLAGS[name].value for name in flags.FLAGS if flags.FLAGS[name].present}
    formats = list(dict.fromkeys([opts.quantize, *_ALSO_QUANTIZE.value]))
    if len(formats) > 1 and command not in ("latency", "throughput"):
        raise app.UsageError("--also_quantize runs latency and throughput only")
    if any(q not in ("none", "int8") for q in formats):
        raise app.UsageError(f"--also_quantize takes none or int8, got {','.join(_ALSO_QUANTIZE.value)}")
    runs = []
    try:
        plan = llamacpp_prepare(command, opts)
        for quantize in formats:
            run_opts = dataclasses.replace(opts, quantize=quantize)
            runs.append(run_command(command, run_opts, _OUTPUT_DIR.value, flags=given, draw=_PLOT.value))
            for line in headline(command, runs[-1][0]["figures"]):
                print(line if len(formats) == 1 else f"[quantize={quantize}] {line}")
        if plan is not None:
            llamacpp = llamacpp_figures(command, opts, plan, runs[0][0]["figures"])
            if command == "latency" and _LLAMACPP_ROUNDS.value > 0:
                llamacpp["alternating"] = llamacpp_rounds(opts, plan, formats, _LLAMACPP_ROUNDS.value)
    except (CheckpointError, ValueError, OSError, RuntimeError) as exc:  # CapacityError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    for doc, path, pngs in runs:
        if plan is not None:
            # the meshserve figures were written first, so a failing llama.cpp run loses none of them
            doc["figures"] = with_llamacpp(command, doc["figures"], llamacpp)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2)
            prefix = "" if len(formats) == 1 else f"[quantize={doc['options']['quantize']}] "
            for line in llamacpp_headline(command, doc["figures"]):
                print(prefix + line)
        print(f"wrote {path}" + "".join(f", {p}" for p in pngs))
    if plan is not None and "alternating" in llamacpp:
        for line in llamacpp_rounds_headline(llamacpp["alternating"]):
            print(line)


if __name__ == "__main__":
    app.run(main)
