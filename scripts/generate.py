"""Offline batch generation with the continuous-batching engine (no server).

Prompts come from --prompt (repeatable) or a JSONL --input file (one object per line with "prompt", "messages" or
"token_ids", and optionally "id" and per-line sampling overrides such as "max_tokens" or "temperature"). Output:
one JSON line per prompt with text, token ids, finish reason and token counts, in input order.

    python scripts/generate.py --chat --prompt "Write a haiku about TPUs."

Multi-process (one command per host; every process runs the same job over the same inputs, process 0 writes):

    python scripts/generate.py --checkpoint=DIR --input=prompts.jsonl --output=out.jsonl --mesh=data:2,tensor:4 \
        --coordinator_address=host0:1234 --num_processes=2 --process_id=$I
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import jax
from absl import app, flags
from tqdm import tqdm

import engine_flags
import sampling_flags
from checkpoints.errors import CheckpointError
from engine import multihost
from engine.engine import CapacityError
from engine.offline import OfflineItem, OfflineResult, run_offline
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output file (default: stdout).")
_CHAT = flags.DEFINE_bool(
    "chat", False, "Treat --prompt / 'prompt' fields as a user message and apply the chat template."
)
_WARMUP = flags.DEFINE_bool("warmup", False, "Compile every shape before generating (what a server does).")

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


def _items() -> list[OfflineItem]:
    base = sampling_flags.sampling_params()
    items: list[OfflineItem] = []
    for i, text in enumerate(_PROMPT.value):
        items.append(_item(str(i), {"prompt": text}, base))
    if _INPUT.value:
        with open(_INPUT.value) as f:
            for n, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    engine_flags.fail(f"{_INPUT.value}:{n + 1} is not valid JSON ({exc.msg})")
                if not isinstance(obj, dict):
                    engine_flags.fail(f"{_INPUT.value}:{n + 1} must be a JSON object")
                items.append(_item(str(obj.get("id", len(items))), obj, base))
    if not items:
        engine_flags.fail("no prompts: pass --prompt or --input")
    return items


def _item(item_id: str, obj: dict, base) -> OfflineItem:
    overrides = {k: v for k, v in obj.items() if k in _SAMPLING_FIELDS}
    for key in ("stop", "stop_token_ids"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    params = dataclasses.replace(base, **overrides)
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is not None and _CHAT.value:
        prompt, messages = None, [{"role": "user", "content": prompt}]
    return OfflineItem(item_id, params, prompt=prompt, messages=messages, token_ids=obj.get("token_ids"))


def _with_seed(params, seed: int):
    return dataclasses.replace(params, seed=seed)


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        engine_flags.initialize_distributed()
        items = _items()
        if jax.process_count() > 1:
            # every process must draw the same tokens: unseeded items get seeds from one draw shared by all
            base = multihost.shared_seed()
            items = [
                it if it.params.seed is not None else dataclasses.replace(it, params=_with_seed(it.params, base + i))
                for i, it in enumerate(items)
            ]
        engine, tokenizer = engine_flags.load()
    except (CheckpointError, CapacityError, ValueError, OSError) as exc:
        engine_flags.fail(str(exc))
    if _WARMUP.value:
        engine.warmup()
    scheduler = Scheduler(engine, tokenizer, prefills_per_step=engine_flags.prefills_per_step())
    leader = multihost.is_leader()
    bar = tqdm(total=len(items), desc="generate", unit="prompt", file=sys.stderr, disable=not leader)

    def done(result: OfflineResult) -> None:
        bar.update(1)

    start = time.perf_counter()
    results = run_offline(scheduler, items, on_done=done)
    elapsed = time.perf_counter() - start
    bar.close()
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results)
    # every process ran the same job for its shards; process 0 writes the one output
    if leader and _OUTPUT.value:
        with open(_OUTPUT.value, "w") as out:
            out.write(lines)
    elif leader:
        sys.stdout.write(lines)
    generated = sum(r.completion_tokens for r in results)
    failed = sum(r.error is not None for r in results)
    logging.info(
        "%d prompts (%d failed), %d tokens in %.2f s: %.1f tokens/s",
        len(results),
        failed,
        generated,
        elapsed,
        generated / elapsed if elapsed else 0.0,
    )


if __name__ == "__main__":
    app.run(main)
