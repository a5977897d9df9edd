"""scripts/generate.py end to end on a tiny checkpoint: JSONL in, JSONL out, bad prompts reported in their own line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from checkpoints.orbax_io import save_checkpoint
from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import init_params, stack_layers
from engine.offline import OfflineItem, run_offline
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import make_tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_FLAGS = ["--num_slots=2", "--max_seq_len=64", "--max_prefill_len=32", "--page_size=32", "--decode_steps=4"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(path, cfg, stack_layers(params, cfg.num_layers), make_tiny_tokenizer())
    return path, cfg, params


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "generate.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_jsonl_job_reports_bad_prompts_and_completes_the_rest(tiny_checkpoint, tmp_path):
    path, cfg, params = tiny_checkpoint
    lines = [
        {"id": "a", "prompt": "hello there"},
        {"id": "bad-role", "messages": [{"role": "wizard", "content": "hi"}]},
        {"id": "too-long", "prompt": "x" * 70},
        {"id": "b", "token_ids": [5, 6, 7, 8], "max_tokens": 3},
        {"id": "bad-temp", "prompt": "hey", "temperature": -1},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _run([f"--checkpoint={path}", f"--input={src}", f"--output={out}", "--max_tokens=6", *ENGINE_FLAGS])
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["a", "bad-role", "too-long", "b", "bad-temp"]
    by_id = {r["id"]: r for r in results}
    assert "wizard" in by_id["bad-role"]["error"]
    assert "70 tokens" in by_id["too-long"]["error"] and "context holds 64" in by_id["too-long"]["error"]
    assert "temperature" in by_id["bad-temp"]["error"]
    assert all(by_id[i]["finish_reason"] == "error" for i in ("bad-role", "too-long", "bad-temp"))

    # the good prompts produced exactly what the engine produces for them in-process
    engine = Engine(cfg, params, EngineConfig(num_slots=2, max_seq_len=64, max_prefill_len=32, page_size=32))
    tok = make_tiny_tokenizer()
    expected = run_offline(
        Scheduler(engine, tok),
        [
            OfflineItem("a", SamplingParams(max_tokens=6), prompt="hello there"),
            OfflineItem("b", SamplingParams(max_tokens=3), token_ids=[5, 6, 7, 8]),
        ],
    )
    for exp in expected:
        got = by_id[exp.id]
        assert got["error"] is None
        assert got["token_ids"] == exp.token_ids
        assert got["text"] == exp.text
        assert got["completion_tokens"] == len(exp.token_ids)
        assert got["finish_reason"] in ("stop", "length")
    assert by_id["b"]["prompt_tokens"] == 4


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    proc = _run([f"--checkpoint={tmp_path / 'nope'}", "--prompt=hi", *ENGINE_FLAGS], timeout=120)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
