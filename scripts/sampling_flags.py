"""Sampling flags of the offline entry points, mapped onto SamplingParams in this one place."""

from __future__ import annotations

from absl import flags

from engine.sampling import SamplingParams

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
