"""A replica's step times for the fleet simulator, read from a measured engine profile (`benchmark.py profile`).

A profile holds tables measured on one engine (bench/step_profile.py): prefill seconds per (new tokens, cached
context) and decode seconds per dispatch per (active slots, context, steps), plus the scheduler's own seconds per
step. `StepProfile` answers for any point by interpolating linearly between measured points (clamped below the
smallest token count and batch, extrapolated linearly past the largest context, where attention's cost keeps
growing). A prefill of more tokens than one call computes is split into calls as the engine does.

`scaled` turns a profile measured here into one for another device by the roofline ratio: prefill by peak FLOP/s,
decode by memory bandwidth (PERFORMANCE.md), the host's per-step time unchanged. The result says so in `source`
("scaled") and in `scaling`: it is a prediction, not a measurement.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
DEFAULT_PROFILE = os.path.join(PROFILE_DIR, "smollm2-135m-cpu-f32.json")


def _interp(xs: Sequence[float], ys: Sequence[float], x: float, *, extrapolate: bool) -> float:
    """Piecewise-linear y(x) through sorted (xs, ys): clamped below xs[0], clamped or extrapolated above xs[-1]."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    if x >= xs[-1]:
        if not extrapolate:
            return ys[-1]
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return max(ys[-1] + slope * (x - xs[-1]), ys[-1] if slope >= 0 else 0.0)
    i = bisect.bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def _grid(rows: Sequence[dict[str, Any]], outer: str, inner: str) -> tuple[list[float], list[list[float]], list]:
    """Rows keyed by (outer, inner) -> (outer values, inner values per outer, seconds per outer)."""
    by: dict[float, list[tuple[float, float]]] = {}
    for r in rows:
        by.setdefault(float(r[outer]), []).append((float(r[inner]), float(r["seconds"])))
    keys = sorted(by)
    pts = [sorted(by[k]) for k in keys]
    return keys, [[p[0] for p in ps] for ps in pts], [[p[1] for p in ps] for ps in pts]


@dataclasses.dataclass
class StepProfile:
    """Step times of one replica's engine, from a profile document (measured or scaled)."""

    doc: dict[str, Any]
    """The profile's figures (the `figures` of a benchmark document)."""
    machine: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Where it was measured (the benchmark document's `machine`)."""
    path: str | None = None

    def __post_init__(self) -> None:
        if not self.doc.get("prefill") or not self.doc.get("decode"):
            raise ValueError(f"profile {self.path or ''} has no prefill or decode table")
        self._prefill = _grid(self.doc["prefill"], "context", "tokens")
        self._decode = {
            int(s): _grid([r for r in self.doc["decode"] if int(r["steps"]) == s], "batch", "context")
            for s in {int(r["steps"]) for r in self.doc["decode"]}
        }

    # ----- the engine the profile was measured on -----------------------------------------------------------------

    @property
    def engine(self) -> dict[str, Any]:
        return self.doc["engine"]

    @property
    def num_slots(self) -> int:
        return int(self.engine["num_slots"])

    @property
    def page_size(self) -> int:
        return int(self.engine["page_size"])

    @property
    def kv_pages(self) -> int:
        """Pages a sequence can use (the sink excluded)."""
        return int(self.engine.get("kv_pages_usable") or self.num_slots * self.engine["max_seq_len"] // self.page_size)

    @property
    def max_seq_len(self) -> int:
        return int(self.engine["max_seq_len"])

    @property
    def max_prefill_len(self) -> int:
        return int(self.engine["max_prefill_len"])

    @property
    def decode_steps(self) -> int:
        return int(self.engine["decode_steps"])

    @property
    def free_slot_decode_steps(self) -> int:
        return int(self.engine.get("free_slot_decode_steps") or self.decode_steps)

    @property
    def prefill_token_budget(self) -> int | None:
        b = self.engine.get("prefill_token_budget")
        return None if not b else int(b)

    @property
    def host_seconds_per_step(self) -> float:
        return float(self.doc.get("host_overhead", {}).get("seconds_per_step", 0.0))

    @property
    def model_name(self) -> str:
        return str(self.doc.get("model", {}).get("name", "?"))

    @property
    def source(self) -> str:
        """ "measured", or "scaled" for a roofline-scaled profile."""
        return str(self.doc.get("source", "measured"))

    def describe(self) -> str:
        """One line naming the model, the engine shape and where the times come from."""
        host = self.doc.get("host", {})
        where = host.get("cpu_model") or self.machine.get("device_kind", "?")
        line = (
            f"{self.model_name} {self.engine.get('dtype', '')}, {self.num_slots} slots, {self.kv_pages} KV pages of "
            f"{self.page_size}, measured on {where} ({self.machine.get('cpu_count', '?')} cores)"
        )
        if self.source == "scaled":
            s = self.doc["scaling"]
            line += f"; SCALED (not measured) to {s['device']}: prefill x{s['prefill_factor']:.3g}, "
            line += f"decode x{s['decode_factor']:.3g}"
        return line

    # ----- times ----------------------------------------------------------------------------------------------------

    def prefill_call_seconds(self, tokens: int, context: float) -> float:
        """One prefill call computing `tokens` (at most max_prefill_len) after `context` cached positions."""
        contexts, xs, ys = self._prefill
        per_context = [_interp(x, y, tokens, extrapolate=True) for x, y in zip(xs, ys, strict=True)]
        return max(_interp(contexts, per_context, context, extrapolate=True), 0.0)

    def prefill_seconds(self, tokens: int, context: float = 0.0) -> float:
        """Computing `tokens` new prompt tokens after `context` cached ones, in calls of at most max_prefill_len."""
        total, done, step = 0.0, 0, self.max_prefill_len
        while done < tokens:
            n = min(step, tokens - done)
            total += self.prefill_call_seconds(n, context + done)
            done += n
        return total

    def decode_seconds(self, batch: int, context: float, steps: int) -> float:
        """One dispatch of `steps` decode steps with `batch` active slots at a mean context of `context` tokens:
        linear in steps between the measured dispatch lengths (a fixed cost per dispatch plus a cost per step)."""
        measured = sorted(self._decode)

        def at(s: int) -> float:
            batches, xs, ys = self._decode[s]
            per_batch = [_interp(x, y, context, extrapolate=True) for x, y in zip(xs, ys, strict=True)]
            return _interp(batches, per_batch, batch, extrapolate=False)

        if len(measured) == 1:
            return at(measured[0]) * steps / measured[0]
        lo, hi = measured[0], measured[-1]
        t_lo, t_hi = at(lo), at(hi)
        return max(t_lo + (t_hi - t_lo) * (steps - lo) / (hi - lo), 0.0)


def load_profile(path: str | None = None) -> StepProfile:
    """A profile from a `benchmark.py profile` document (or its bare figures); default: the bundled one."""
    path = path or DEFAULT_PROFILE
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    figures = doc.get("figures", doc)
    if figures.get("kind") != "meshserve.step_profile":
        raise ValueError(f"{path} is not a step profile (write one with `scripts/benchmark.py profile`)")
    return StepProfile(figures, doc.get("machine", {}), path)


def scaled(profile: StepProfile, device: str) -> StepProfile:
    """`profile` predicted on a preset device (bench.roofline.PRESETS) by the roofline ratio: prefill times by the
    ratio of peak FLOP/s, decode times by the ratio of bandwidth, both against the limits measured with the profile;
    the host's per-step time is kept. Labelled "scaled" (a prediction, not a measurement)."""
    from bench import roofline as rl

    target = rl.preset(device)
    here = profile.doc.get("limits")
    if not here:
        raise ValueError("the profile records no measured limits; it cannot be scaled")
    # presets are bf16 figures: decode there moves 2 bytes per element where the profile's dtype moved `itemsize`
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(str(profile.engine.get("dtype")), 2)
    prefill_factor = here["peak_tflop_s"] * 1e12 / target.peak_flops
    decode_factor = here["bandwidth_gb_s"] * 1e9 / target.bandwidth * 2 / itemsize
    doc = copy.deepcopy(profile.doc)
    for row in doc["prefill"]:
        row["seconds"] *= prefill_factor
        row.pop("runs_s", None)
    for row in doc["decode"]:
        row["seconds"] *= decode_factor
        row.pop("runs_s", None)
    doc["source"] = "scaled"
    doc["scaling"] = {
        "device": target.name,
        "device_source": target.source,
        "from": profile.describe(),
        "prefill_factor": prefill_factor,
        "decode_factor": decode_factor,
        "rule": "prefill x (measured peak FLOP/s / target bf16 peak), decode x (measured bandwidth / target "
        "bandwidth x 2 / bytes per element measured); the scheduler's per-step host time and the engine shape kept",
    }
    doc["limits"] = {"bandwidth_gb_s": target.bandwidth / 1e9, "peak_tflop_s": target.peak_flops / 1e12}
    return StepProfile(doc, profile.machine, None)


def synthetic(
    *,
    prefill_fixed_s: float = 0.01,
    prefill_per_token_s: float = 0.001,
    decode_fixed_s: float = 0.005,
    decode_per_step_s: float = 0.02,
    num_slots: int = 4,
    kv_pages: int = 64,
    page_size: int = 16,
    max_seq_len: int = 512,
    max_prefill_len: int = 256,
    decode_steps: int = 4,
    free_slot_decode_steps: int = 1,
    prefill_token_budget: int | None = None,
    host_s: float = 0.0,
) -> StepProfile:
    """A hand-made profile (no context or batch effect): a prefill call of n tokens takes prefill_fixed_s +
    n x prefill_per_token_s, a dispatch of k steps decode_fixed_s + k x decode_per_step_s (tests, what-ifs)."""
    tokens = (1, max_prefill_len)
    doc = {
        "kind": "meshserve.step_profile",
        "version": 1,
        "source": "synthetic",
        "model": {"name": "synthetic"},
        "engine": {
            "num_slots": num_slots,
            "kv_pages_usable": kv_pages,
            "page_size": page_size,
            "max_seq_len": max_seq_len,
            "max_prefill_len": max_prefill_len,
            "decode_steps": decode_steps,
            "free_slot_decode_steps": free_slot_decode_steps,
            "prefill_token_budget": prefill_token_budget,
            "dtype": "float32",
        },
        "prefill": [
            {"tokens": n, "context": c, "seconds": prefill_fixed_s + n * prefill_per_token_s}
            for n in tokens
            for c in (0, max_seq_len)
        ],
        "decode": [
            {"batch": b, "context": c, "steps": k, "seconds": decode_fixed_s + k * decode_per_step_s}
            for b in (1, num_slots)
            for c in (0, max_seq_len)
            for k in sorted({1, decode_steps})
        ],
        "host_overhead": {"seconds_per_step": host_s},
    }
    return StepProfile(doc)
