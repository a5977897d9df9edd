"""The engine, mesh and multi-process flags every entry point shares, mapped onto EngineConfig in this one place."""

from __future__ import annotations

import sys

from absl import flags

from checkpoints.bundled import resolve_checkpoint
from checkpoints.orbax_io import load_config
from engine import multihost
from engine.api import MAX_KERNEL_SPIN_US
from engine.engine import Engine, EngineConfig, default_dtype
from engine.load import enable_compilation_cache as enable_compilation_cache_in
from engine.load import load_engine
from engine.tokenizer import Tokenizer
from sharding.mesh import Mesh, make_mesh

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Model: 'bundled' (default: SmolLM2-135M-Instruct), an orbax dir, a .gguf, or an HF folder."
)
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together (B); fixed at start-up.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "Context per slot: prompt + max_tokens must fit.")
_MAX_PREFILL_LEN = flags.DEFINE_integer(
    "max_prefill_len", 1024, "Most tokens one prefill call computes (largest bucket); longer prompts run in chunks."
)
_FINE_PREFILL_BUCKETS = flags.DEFINE_bool(
    "fine_prefill_buckets",
    True,
    "Prefill buckets at powers of two and 1.5x them: a call computes less than 1.5x the tokens it holds (powers of "
    "two alone: up to 2x). --nofine_prefill_buckets: powers of two only, about half the prefill compiles at start-up.",
)
_PAGE_SIZE = flags.DEFINE_integer("page_size", 64, "KV page length (positions); max_seq_len must be a multiple.")
_KV_PAGES = flags.DEFINE_integer(
    "kv_pages",
    None,
    "KV pool pages shared by all slots (one is the sink); default: from --kv_memory_fraction on TPU/GPU, "
    "num_slots * max_seq_len / page_size on CPU.",
)
_KV_MEMORY_FRACTION = flags.DEFINE_float(
    "kv_memory_fraction", 0.85, "Share of device memory weights + KV pool may take when --kv_pages is not given."
)
_PREFIX_CACHING = flags.DEFINE_bool(
    "prefix_caching",
    True,
    "Keep finished requests' KV pages indexed by their tokens, so a prompt starting the same way (the next turn of "
    "a chat, a shared system prompt) computes only the rest.",
)
_ADMISSION = flags.DEFINE_enum(
    "admission",
    "reserve",
    ["reserve", "grow"],
    "KV memory taken at admission: 'reserve' every page a request can ever need (prompt + max_tokens; it never "
    "waits for memory), 'grow' its prompt and one dispatch (more requests fit; when the pool runs dry the lowest-"
    "priority, youngest request is preempted and later resumed from the prefix cache).",
)
_HOST_KV_BYTES = flags.DEFINE_integer(
    "host_kv_bytes",
    0,
    "Host RAM (bytes) for the second tier of the prefix cache: KV pages evicted from the device are copied there "
    "and copied back on a hit instead of being recomputed; 0: none.",
)
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", 8, "Decode steps per dispatch: more amortizes host overhead, fewer frees finished slots sooner."
)
_PREFILLS_PER_STEP = flags.DEFINE_integer(
    "prefills_per_step", 64, "Most prompts admitted between two decode dispatches (each needs a slot and KV pages)."
)
_PREFILL_SEGMENTS = flags.DEFINE_integer(
    "prefill_segments",
    32,
    "Most prompts packed into one prefill call (their total within max_prefill_len, one per 8 of its tokens at most).",
)
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "auto: float32 on CPU, bf16 on TPU/GPU.")
_ATTENTION = flags.DEFINE_enum(
    "attention",
    "auto",
    ["auto", "kernel", "pallas", "xla"],
    "Decode attention: 'kernel' (hand-written CPU kernel, built on first use with the system C++ compiler), 'pallas' "
    "(TPU/GPU kernels), 'xla' (any backend), 'auto' (the CPU kernel on CPU in float32 when a compiler exists, "
    "Pallas on TPU/GPU).",
)
_LINEAR = flags.DEFINE_enum(
    "linear",
    "auto",
    ["auto", "kernel", "xla"],
    "Weight products: 'kernel' (weights packed at load for a hand-written CPU kernel, built like --attention's), "
    "'xla' (any backend and mesh), 'auto' (the kernel on one CPU device in float32 with 1 or >= 16 slots, or with "
    "int8 weights).",
)
_QUANTIZE = flags.DEFINE_enum(
    "quantize",
    "none",
    ["none", "int8"],
    "Weight format: 'int8' quantizes the linear weights, embedding and head at load (int8 + a float32 scale per "
    "output channel; activations stay in --dtype): a quarter of float32's bytes, half of bfloat16's.",
)
_KV_DTYPE = flags.DEFINE_enum(
    "kv_dtype",
    "auto",
    ["auto", "int8"],
    "KV cache format: 'auto' stores K/V in --dtype; 'int8' stores int8 values with a bfloat16 scale per token and kv "
    "head (1.94x bfloat16's tokens in the same memory, 3.9x float32's); attention runs XLA's formulation.",
)
_HUGE_PAGES = flags.DEFINE_bool(
    "huge_pages",
    True,
    "CPU: copy the weights at load into 2 MiB pages (transparent huge pages, where the kernel allows them); a decode "
    "step streams every weight, and 4 KiB pages cost it TLB misses. No effect on TPU/GPU.",
)
_KERNEL_SPIN_US = flags.DEFINE_integer(
    "kernel_spin_us",
    200,
    "CPU kernels: how long their helper threads wait for the next call spinning before they sleep; 0 hands each "
    "call's work to XLA's thread pool (no spinning, for cores shared with other processes). serve.py's default is 0 "
    "(a server shares its cores with its request threads and the gateway).",
    lower_bound=0,
    upper_bound=MAX_KERNEL_SPIN_US,
)
_MESH = flags.DEFINE_string(
    "mesh",
    "auto",
    "Device mesh over all devices of all processes: 'data:D,tensor:T' (D x T = device count) or 'auto' "
    "(tensor-parallel first, as far as the model's kv heads divide).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: host:port of process 0's coordination service."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "Processes (hosts) in the job; 0 = read the TPU pod / cluster environment."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    "default",
    "Directory persisting compiled executables across runs ('default': under the meshserve cache; '' disables).",
)


_distributed_done = False


def fail(message: str) -> None:
    """A one-line error on stderr and exit status 1 (no traceback for input the user can fix)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def initialize_distributed() -> None:
    """Joins the multi-process job the flags describe (nothing for a single process); call before any device use.

    Idempotent: later calls do nothing."""
    global _distributed_done
    if _distributed_done:
        return
    _distributed_done = True
    n = _NUM_PROCESSES.value
    if n == 0:
        multihost.initialize_distributed()
    elif n > 1:
        multihost.initialize_distributed(_COORDINATOR_ADDRESS.value, n, _PROCESS_ID.value)


def mesh(kv_heads: int | None = None) -> Mesh:
    """The --mesh over every device of the job (`kv_heads` refines 'auto'); ValueError explains a bad spec."""
    return make_mesh(_MESH.value, kv_heads=kv_heads)


def checkpoint() -> str | None:
    return _CHECKPOINT.value


def prefills_per_step() -> int:
    return _PREFILLS_PER_STEP.value


def engine_config(**overrides) -> EngineConfig:
    """EngineConfig from the flags (overrides win)."""
    values = dict(
        num_slots=_NUM_SLOTS.value,
        max_seq_len=_MAX_SEQ_LEN.value,
        max_prefill_len=min(_MAX_PREFILL_LEN.value, _MAX_SEQ_LEN.value),
        fine_prefill_buckets=_FINE_PREFILL_BUCKETS.value,
        page_size=min(_PAGE_SIZE.value, _MAX_SEQ_LEN.value),
        decode_steps=_DECODE_STEPS.value,
        prefill_segments=_PREFILL_SEGMENTS.value,
        kv_pages=_KV_PAGES.value,
        kv_memory_fraction=_KV_MEMORY_FRACTION.value,
        prefix_caching=_PREFIX_CACHING.value,
        host_kv_bytes=_HOST_KV_BYTES.value,
        admission=_ADMISSION.value,
        dtype=default_dtype() if _DTYPE.value == "auto" else _DTYPE.value,
        attention=_ATTENTION.value,
        linear=_LINEAR.value,
        quantize=_QUANTIZE.value,
        kv_dtype=_KV_DTYPE.value,
        huge_pages=_HUGE_PAGES.value,
        kernel_spin_us=_KERNEL_SPIN_US.value,
    )
    values.update(overrides)
    return EngineConfig(**values)


def enable_compilation_cache() -> None:
    """Turns on the persistent compilation cache the flag names."""
    if _COMPILATION_CACHE.value:
        enable_compilation_cache_in(None if _COMPILATION_CACHE.value == "default" else _COMPILATION_CACHE.value)


def load() -> tuple[Engine, Tokenizer]:
    """Joins the multi-process job, builds the mesh and restores the checkpoint into it, all from the flags.

    Raises CheckpointError / CapacityError / ValueError with a message for the user.
    """
    initialize_distributed()
    enable_compilation_cache()
    directory = resolve_checkpoint(_CHECKPOINT.value, _QUANTIZE.value)  # an int8 engine: the int8 conversion
    config = engine_config()
    return load_engine(directory, config, mesh=mesh(kv_heads=load_config(directory).num_kv_heads))
