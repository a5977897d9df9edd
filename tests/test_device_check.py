"""scripts/device_check.sh end to end on the CPU (its tiny profile, chosen because JAX sees no accelerator): every
section is written and passes; the summary and the verdict on made-up failing results; and the script's imports
need nothing the accelerator machine lacks (it gets JAX, flax, orbax, chex, absl, numpy, grpcio and the tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from scripts import device_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's dependencies the accelerator machine does not have (checkpoint conversion, tokenizer, serving).
ABSENT_THERE = ("gguf", "tokenizers", "jinja2", "safetensors", "tqdm", "prometheus_client", "matplotlib", "torch")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu", "DEVICE_CHECK_LIMIT_S": "150"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "device_check.sh"), str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    with open(out / device_check.JSON_NAME) as f:
        results = json.load(f)
    return proc, results, out


def test_tiny_run_passes_every_section(tiny_run):
    proc, results, out = tiny_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert results["ok"] and results["failures"] == [] and results["mode"] == "tiny"

    machine = results["machine"]
    assert machine["ok"] and machine["backend"] == "cpu"
    assert machine["bandwidth_bytes_per_s"] > 1e8 and machine["matmul_flop_per_s"] > 1e8

    attention = results["attention"]
    assert attention["ok"] and attention["interpret"] and attention["pallas_backend"] == "gpu"
    seen = {(r["impl"], r["dtype"]) for r in attention["rows"]}
    assert {("xla", "bfloat16"), ("pallas", "bfloat16"), ("xla", "float32"), ("pallas", "float32")} <= seen
    for r in attention["rows"]:
        assert r["ok"] and r["rel_err"] <= r["tolerance_rel"], r
        if r["dtype"] == "bfloat16":
            assert r["time_s"] > 0 and r["kv_bytes_read"] > 0 and r["bandwidth_bytes_per_s"] > 0

    engine = results["engine"]
    assert engine["ok"] and engine["skipped"] == []
    assert [r["slots"] for r in engine["runs"]] == list(device_check.TINY.slot_counts)
    for r in engine["runs"]:
        assert r["ok"] and r["compiles_after_warmup"] == 0, r
        d = r["decode"]
        assert d["step_s"] > 0 and d["mbu"] > 0 and d["bytes_per_step"] > d["weight_bytes"] > 0
    assert engine["runs"][0]["prefill"]["mfu"] > 0

    summary = (out / device_check.SUMMARY_NAME).read_text()
    assert "device check: PASS" in summary and "| slots |" in summary
    assert "device check: PASS" in proc.stdout  # printed too
    assert (out / "device_check.log").exists()


def test_summary_and_verdict_name_each_failure(tmp_path):
    run = device_check.Run(str(tmp_path), device_check.TINY)
    run.results["attention"] = {
        "ok": False,
        "pallas_backend": "gpu",
        "interpret": False,
        "K": 8,
        "G": 4,
        "H": 64,
        "positions_per_slot": 2048,
        "rows": [
            {"B": 8, "P": 16, "W": 128, "impl": "pallas", "dtype": "bfloat16", "ok": False, "rel_err": 0.5},
            {"B": 8, "P": 16, "W": 128, "impl": "xla", "dtype": "float32", "ok": False, "error": "unsupported: x"},
        ],
    }
    run.fail("attention pallas bfloat16 B=8 P=16: rel. error 5.0e-01 > 3e-02")
    run.section("engine", lambda: {}["missing"])  # a step that raises fails, the next ones still run
    run.close()
    run.write()
    results = json.loads((tmp_path / device_check.JSON_NAME).read_text())
    assert not results["ok"] and len(results["failures"]) == 2
    assert results["engine"]["ok"] is False and "KeyError" in results["engine"]["error"]
    text = (tmp_path / device_check.SUMMARY_NAME).read_text()
    assert "device check: FAIL" in text and "| 8 | 16 | pallas | bfloat16 | 5.0e-01 | NO |" in text
    assert "rel. error 5.0e-01" in text and "engine: KeyError" in text


def test_imports_need_nothing_the_accelerator_machine_lacks():
    code = (
        "import sys; import scripts.device_check, engine.engine, engine.model, engine.sampling, "
        "engine.pallas_attention, jax.experimental.pallas.triton, jax.experimental.pallas.tpu; "
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    loaded = set(json.loads(proc.stdout.strip().replace("'", '"')))
    assert not loaded & set(ABSENT_THERE), sorted(loaded & set(ABSENT_THERE))
