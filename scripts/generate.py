"""Offline batch generation with the continuous-batching engine (no server).

Prompts come from --prompt (repeatable) or a JSONL --input file (one object per line with "prompt", "messages" or
"token_ids", and optionally "id" and per-line sampling overrides such as "max_tokens" or "temperature"). Output:
one JSON line per prompt with text, token ids, finish reason and token counts, in input order.

    python scripts/generate.py --chat --prompt "Write a haiku about TPUs."
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

import engine_flags
from absl import app, flags
from tqdm import tqdm

from checkpoints.errors import CheckpointError
from engine.engine import CapacityError
from engine.load import load_engine
from engine.offline import OfflineItem, OfflineResult, run_offline
from engine.scheduler import Scheduler

_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_INPUT = flags.DEFINE_string("input", None, "JSONL file of prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL output file (default: stdout).")
_CHAT = flags.DEFINE_bool(
    "chat", False, "Treat --prompt / 'prompt' fields as a user message and apply the chat template."
)
_WARMUP = flags.DEFINE_bool("warmup", False, "Compile every shape before generating (what a server does).")

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(engine_flags.SamplingParams)}


def _items() -> list[OfflineItem]:
    base = engine_flags.sampling_params()
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


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        items = _items()
        config = engine_flags.engine_config()
        engine, tokenizer = load_engine(engine_flags.checkpoint(), config)
    except (CheckpointError, CapacityError, ValueError, OSError) as exc:
        engine_flags.fail(str(exc))
    if _WARMUP.value:
        engine.warmup()
    scheduler = Scheduler(engine, tokenizer, prefills_per_step=engine_flags.prefills_per_step())
    bar = tqdm(total=len(items), desc="generate", unit="prompt", file=sys.stderr)

    def done(result: OfflineResult) -> None:
        bar.update(1)

    start = time.perf_counter()
    results = run_offline(scheduler, items, on_done=done)
    elapsed = time.perf_counter() - start
    bar.close()
    lines = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as out:
            out.write(lines)
    else:
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
