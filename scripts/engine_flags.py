"""The absl flags every entry point shares, mapped onto EngineConfig / SamplingParams in this one place."""

from __future__ import annotations

import sys

from absl import flags

from engine.engine import EngineConfig, default_dtype
from engine.sampling import SamplingParams

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Model: 'bundled' (default: SmolLM2-135M-Instruct), an orbax dir, a .gguf, or an HF folder."
)
_NUM_SLOTS = flags.DEFINE_integer("num_slots", 8, "Requests decoded together (B); fixed at start-up.")
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", 2048, "Context per slot: prompt + max_tokens must fit.")
_MAX_PREFILL_LEN = flags.DEFINE_integer("max_prefill_len", 1024, "Longest prompt (largest prefill bucket).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 128, "KV cache page length; max_seq_len must be a multiple.")
_DECODE_STEPS = flags.DEFINE_integer(
    "decode_steps", 8, "Decode steps per dispatch: more amortizes host overhead, fewer frees finished slots sooner."
)
_PREFILLS_PER_STEP = flags.DEFINE_integer(
    "prefills_per_step",
    4,
    "Most prefills between two decode dispatches: higher admits bursts sooner (lower TTFT), lower keeps "
    "inter-token latency of running requests steady.",
)
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"], "auto: float32 on CPU, bf16 on TPU/GPU.")

_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 disables.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 disables.")
_MIN_P = flags.DEFINE_float("min_p", 0.0, "0 disables.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (per request: the same seed gives the same tokens).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 128, "Most tokens to generate per prompt.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
_STOP_TOKEN_IDS = flags.DEFINE_list("stop_token_ids", [], "Comma-separated token ids that end generation.")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Generate through EOS (benchmarks).")
_LOGPROBS = flags.DEFINE_integer("logprobs", None, "Return each token's log-probability and this many top ones.")


def fail(message: str) -> None:
    """A one-line error on stderr and exit status 1 (no traceback for input the user can fix)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


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
        page_size=min(_PAGE_SIZE.value, _MAX_SEQ_LEN.value),
        decode_steps=_DECODE_STEPS.value,
        dtype=default_dtype() if _DTYPE.value == "auto" else _DTYPE.value,
    )
    values.update(overrides)
    return EngineConfig(**values)


def sampling_params(**overrides) -> SamplingParams:
    """SamplingParams from the flags (overrides win); ValueError names a bad stop_token_ids entry."""
    try:
        stop_ids = tuple(int(t) for t in _STOP_TOKEN_IDS.value)
    except ValueError as exc:
        raise ValueError(f"--stop_token_ids must be integers: {exc}") from exc
    values = dict(
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        min_p=_MIN_P.value,
        seed=_SEED.value,
        max_tokens=_MAX_TOKENS.value,
        stop=tuple(_STOP.value),
        stop_token_ids=stop_ids,
        ignore_eos=_IGNORE_EOS.value,
        logprobs=_LOGPROBS.value,
    )
    values.update(overrides)
    return SamplingParams(**values)
