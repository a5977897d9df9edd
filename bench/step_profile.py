"""`benchmark.py profile`: how long the engine's calls take, as tables a simulator can replay (fleet/sim.py).

Measured on one engine of the options' model and slot count (the replica as it would serve):
- prefill: `Engine.prefill_batch` of `ttft_prompt_lens` new tokens after a cached opening of each context length
  (0 and the `contexts` that fit), the first token on the host; wall seconds, median of `repeats` after one untimed
  run (which compiles the shape).
- decode: `Engine.generate` dispatches of 1 step (a server's dispatch while a slot is free) and of `decode_steps`
  steps, with `slot_counts` slots active (of the engine's `num_slots`: the compiled step runs every slot whatever
  their number, so an idle slot still costs) at each context; seconds per dispatch, median of `repeats`.
- host: the scheduler's own time per step (planning, inserts, releases, streaming to the sinks), from an offline job
  on the real `Scheduler` whose engine calls are timed apart: wall - prefill_batch - generate, per step.
- limits: this device's bandwidth and matmul FLOP/s in the engine's dtype, measured in the same run, so that a
  profile can be scaled to another device by the roofline ratio (fleet/sim_profile.py; labelled as scaled).

Figures go under the benchmark document's "figures" (scripts/benchmark.py adds the machine and the flags).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from engine.sampling import SamplingParams

if TYPE_CHECKING:
    from bench.runner import Options
    from engine.engine import Engine

PROFILE_KIND = "meshserve.step_profile"
PROFILE_VERSION = 1
SERVER_FREE_SLOT_DECODE_STEPS = 1
"""The dispatch length a server runs while a slot is free (service.server.ServerConfig's default)."""


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _ids(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return [int(t) for t in rng.integers(2, vocab, size=n)]


def _median_after_one(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Runs `fn` (which returns the seconds it timed) once untimed, then `repeats` times; (median, runs)."""
    fn()
    runs = [fn() for _ in range(max(repeats, 1))]
    return statistics.median(runs), runs


def prefill_point(engine: Engine, rng: np.random.Generator, tokens: int, context: int, repeats: int) -> dict:
    """Seconds of one `prefill_batch` computing `tokens` new tokens after `context` cached ones."""
    vocab = engine.model_config.vocab_size
    opening = _ids(rng, context, vocab)

    def once() -> float:
        engine.clear_prefix_cache()
        if context:
            engine.discard(engine.prefill(opening, _greedy(2), seed=0))  # its pages stay cached
        ids = opening + _ids(rng, tokens, vocab)
        start = time.perf_counter()
        (prefix,) = engine.prefill_batch([(ids, _greedy(2), 0)])
        seconds = time.perf_counter() - start
        engine.discard(prefix)
        if prefix.cached != context:
            raise RuntimeError(f"prefill after a {context}-token opening read {prefix.cached} cached tokens")
        return seconds

    seconds, runs = _median_after_one(once, repeats)
    return {"tokens": tokens, "context": context, "seconds": seconds, "runs_s": runs}


def decode_points(
    engine: Engine, rng: np.random.Generator, batch: int, context: int, steps: Sequence[int], repeats: int
) -> list[dict]:
    """Seconds per `generate` dispatch of each length in `steps`, `batch` slots active at about `context` tokens."""
    cfg = engine.config
    room = (len(steps) * (repeats + 1) + 1) * max(steps)
    if context + room > cfg.max_seq_len:
        raise ValueError(f"context {context} + {room} decoded tokens exceeds max_seq_len {cfg.max_seq_len}")
    engine.reset()
    ids = _ids(rng, context, engine.model_config.vocab_size)
    for slot in range(batch):  # the first computes the prompt, the others share its pages
        engine.insert(engine.prefill(ids, _greedy(room), seed=slot), slot)
    jax.block_until_ready(engine.state)
    rows = []
    for n in steps:
        lengths: list[float] = []

        def once(n: int = n, lengths: list[float] = lengths) -> float:
            lengths.append(float(engine.host_lengths[:batch].mean()))
            start = time.perf_counter()
            out = engine.generate(n)
            seconds = time.perf_counter() - start
            if int(out.valid.sum()) != n * batch:
                raise RuntimeError(f"dispatch produced {int(out.valid.sum())} tokens, expected {n * batch}")
            return seconds

        seconds, runs = _median_after_one(once, repeats)
        rows.append(
            {
                "batch": batch,
                "context": float(np.mean(lengths)),
                "steps": n,
                "seconds": seconds,
                "runs_s": runs,
                "window": engine.last_window,
            }
        )
    for slot in range(batch):
        engine.release(slot)
    return rows


class _TimedEngine:
    """The engine with its prefill_batch and generate calls timed (everything else passes through)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.prefill_s = 0.0
        self.generate_s = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def prefill_batch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._engine.prefill_batch(*args, **kwargs)
        finally:
            self.prefill_s += time.perf_counter() - start

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._engine.generate(*args, **kwargs)
        finally:
            self.generate_s += time.perf_counter() - start


def host_overhead(engine: Engine, tokenizer: Any, rng: np.random.Generator, opts: Options) -> dict:
    """The scheduler's own seconds per step beside the engine calls: an offline job of `num_slots` prompts of
    `ttft_prompt_lens[0]` tokens, each generating `max_tokens`, through the real Scheduler with streaming sinks."""
    from engine.scheduler import Request, Scheduler

    timed = _TimedEngine(engine)
    scheduler = Scheduler(timed, tokenizer, free_slot_decode_steps=SERVER_FREE_SLOT_DECODE_STEPS,
                          prefill_token_budget=opts.prefill_token_budget)  # fmt: skip
    n = engine.config.num_slots
    length = min(min(opts.ttft_prompt_lens), engine.config.max_seq_len // 2)
    max_tokens = max(2, min(opts.max_tokens, engine.config.max_seq_len - length))

    def job() -> tuple[float, int]:
        engine.clear_prefix_cache()
        timed.prefill_s = timed.generate_s = 0.0
        steps0 = scheduler.stats().steps
        for i in range(n):
            ids = _ids(rng, length, engine.model_config.vocab_size)
            scheduler.submit(Request(f"h{i}-{time.perf_counter()}", ids, _greedy(max_tokens), lambda _: None))
        start = time.perf_counter()
        scheduler.run_until_idle(max_steps=100_000)
        wall = time.perf_counter() - start
        return wall - timed.prefill_s - timed.generate_s, scheduler.stats().steps - steps0

    job()  # compiles whatever the measurements before did not
    runs = [job() for _ in range(max(opts.repeats, 1))]
    per_step = [s / k for s, k in runs if k]
    return {
        "seconds_per_step": statistics.median(per_step),
        "runs_s_per_step": per_step,
        "requests": n,
        "prompt_tokens": length,
        "max_tokens": max_tokens,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def grid(opts: Options, engine: Engine) -> tuple[list[int], list[int], list[int]]:
    """(prefill token counts, contexts, decode batches) the options ask for that this engine can run."""
    cfg = engine.config
    room = (2 * (opts.repeats + 1) + 1) * cfg.decode_steps
    contexts = sorted({0, *(c for c in opts.contexts if c > 0 and c + room < cfg.max_seq_len)})
    if len(contexts) < 2:
        raise ValueError(
            f"--contexts {list(opts.contexts)}: none fits max_seq_len {cfg.max_seq_len} with {room} tokens of decode "
            "room; give smaller contexts or a larger --max_seq_len"
        )
    tokens = sorted({n for n in opts.ttft_prompt_lens if 0 < n <= cfg.max_prefill_len})
    if not tokens:
        raise ValueError(f"--ttft_prompt_lens {list(opts.ttft_prompt_lens)}: none within max_prefill_len")
    batches = sorted({b for b in opts.slot_counts if 1 <= b <= cfg.num_slots} | {cfg.num_slots})
    return tokens, contexts, batches


def profile(opts: Options) -> dict[str, Any]:
    """The step profile of one replica: prefill and decode tables, host overhead and this device's limits."""
    from bench import runner

    engine, tokenizer = runner.load_model(opts)
    rng = np.random.default_rng(opts.seed)
    tokens, contexts, batches = grid(opts, engine)
    bar = runner._bar(opts, len(tokens) * len(contexts) + len(batches) * len(contexts) + 2, "profile")
    prefill_rows = []
    for c in contexts:
        for n in tokens:
            if c + n < engine.config.max_seq_len:
                prefill_rows.append(prefill_point(engine, rng, n, c, opts.repeats))
            bar.update(1)
    steps = sorted({SERVER_FREE_SLOT_DECODE_STEPS, engine.config.decode_steps})
    decode_rows = []
    for b in batches:
        for c in contexts:
            decode_rows += decode_points(engine, rng, b, max(c, 1), steps, opts.repeats)
            bar.update(1)
    host = host_overhead(engine, tokenizer, rng, opts)
    bar.update(1)
    device = runner.limits(opts)
    bar.update(1)
    bar.close()
    cfg = engine.config
    return {
        "kind": PROFILE_KIND,
        "version": PROFILE_VERSION,
        "source": "measured",
        "host": {"cpu_model": _cpu_model(), "node": platform.node(), "device": f"{device.name}"},
        "model": runner.model_summary(engine),
        "engine": {
            **{k: v for k, v in dataclasses.asdict(cfg).items() if isinstance(v, int | str | bool | float)},
            "kv_pages_usable": int(engine.pool.usable),
            "prefill_token_budget": opts.prefill_token_budget,
            "free_slot_decode_steps": SERVER_FREE_SLOT_DECODE_STEPS,
            "prefills_per_step": opts.prefills_per_step,
        },
        "limits": {"bandwidth_gb_s": device.bandwidth / 1e9, "peak_tflop_s": device.peak_flops / 1e12},
        "prefill": prefill_rows,
        "decode": decode_rows,
        "host_overhead": host,
    }
