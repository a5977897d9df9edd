"""The benchmark tool: its arithmetic on hand-computed cases (percentiles, TPOT, goodput, roofline, MBU/MFU), and
every subcommand run end to end on the tiny random model with small counts, checking the JSON it writes.

Engines are cached per process by the bench runner, so the commands here share one tiny engine config (and its
compiled shapes) wherever they can.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bench import roofline as rl
from bench import runner, stats, workloads
from bench.serve_client import arrival_times
from bench.stats import SLO, RequestRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One engine shape for every command: one prefill bucket (16), one decode window (a 64-token page).
TINY = dict(
    random_model="tiny",
    dtype="float32",
    num_slots=2,
    slot_counts=(1, 2),
    max_seq_len=64,
    max_prefill_len=16,
    page_size=64,
    decode_steps=4,
    random_prompt_lens=(8,),
    num_prompts=3,
    max_tokens=9,  # 1 from prefill + 2 full dispatches of 4
    ttft_prompt_lens=(16,),
    repeats=1,
    bandwidth_mb=16,
    matmul_n=256,
    contexts=(64, 1024),
    progress=False,
)


def tiny_options(**overrides) -> runner.Options:
    return runner.Options(**{**TINY, **overrides})


# ----- arithmetic ---------------------------------------------------------------------------------------------------


def test_percentiles_from_known_samples():
    samples = list(range(1, 11))  # 1..10
    assert stats.percentile(samples, 50) == pytest.approx(5.5)
    assert stats.percentile(samples, 90) == pytest.approx(9.1)  # rank 0.9 * 9 = 8.1 -> 9 + 0.1 * (10 - 9)
    assert stats.percentile(samples, 99) == pytest.approx(9.91)
    s = stats.summarize([0.001, 0.002, 0.003], scale=1e3)
    assert s == {"count": 3, "mean": pytest.approx(2.0), "p50": pytest.approx(2.0), "p90": pytest.approx(2.8),
                 "p99": pytest.approx(2.98), "min": pytest.approx(1.0), "max": pytest.approx(3.0)}  # fmt: skip
    assert math.isnan(stats.summarize([])["p50"])


def test_tpot_formula_and_inter_token_gaps():
    assert stats.tpot(e2e=1.0, ttft=0.2, output_tokens=5) == pytest.approx(0.2)  # (1.0 - 0.2) / 4
    assert stats.tpot(e2e=1.0, ttft=0.2, output_tokens=1) is None
    # chunks: 1 token at 0.2 s, 2 tokens at 0.6 s, 2 tokens at 1.0 s
    r = RequestRecord("a", output_tokens=5, ttft=0.2, e2e=1.0, chunks=[(0.2, 1), (0.6, 2), (1.0, 2)])
    assert r.tpot == pytest.approx(0.2)
    assert r.itl() == pytest.approx([0.2, 0.2, 0.2, 0.2])
    assert sum(r.itl()) == pytest.approx(r.e2e - r.ttft)
    assert RequestRecord("b", status="INTERNAL", ttft=0.1, e2e=0.5, output_tokens=3).tpot is None


def test_goodput_from_known_samples():
    def rec(i, ttft, e2e, tokens, status="OK"):
        return RequestRecord(str(i), output_tokens=tokens, ttft=ttft, e2e=e2e, status=status)

    records = [
        rec(0, 0.1, 1.1, 11),  # TPOT 0.1: meets both
        rec(1, 0.6, 1.6, 11),  # TTFT 0.6 > 0.5
        rec(2, 0.1, 3.1, 11),  # TPOT 0.3 > 0.2
        rec(3, 0.1, 0.1, 1),  # one token: TPOT vacuous, meets
        rec(4, 0.1, 0.2, 2, status="UNAVAILABLE"),  # failed never counts
    ]
    g = stats.goodput(records, SLO(ttft=0.5, tpot=0.2), duration=4.0)
    assert g == {"requests_meeting_slo": 2, "slo_attainment": pytest.approx(0.4), "goodput_requests_per_s": 0.5}
    summary = stats.serving_summary(records, 4.0, SLO(ttft=0.5, tpot=0.2))
    assert summary["completed"] == 4 and summary["failed"] == 1
    assert summary["failures"] == [{"request_id": "4", "status": "UNAVAILABLE", "error": None}]
    assert summary["output_tokens_per_s"] == pytest.approx((11 + 11 + 11 + 1) / 4.0)
    assert summary["tpot_ms"]["count"] == 3  # the one-token request has no TPOT


def test_roofline_hand_computed():
    device = rl.DeviceSpec("toy", bandwidth=1000.0, peak_flops=1e4)
    line = rl.Roofline(n_params=100, weight_bytes=400, kv_bytes_per_token=10, device=device)
    assert line.critical_batch == pytest.approx(1e4 / 1000 * 4 / 2)  # 20
    assert line.memory_seconds(2, 5) == pytest.approx((400 + 2 * 5 * 10) / 1000)
    assert line.compute_seconds(2) == pytest.approx(2 * 100 * 2 / 1e4)
    assert line.tokens_per_second(2, 5) == pytest.approx(2 / 0.5)
    # with 1 token of KV per slot the bounds meet at 40 slots: (400 + 40 * 10) / 1000 == 2 * 100 * 40 / 1e4 == 0.8
    assert line.critical_batch_at(1) == pytest.approx(40)
    assert line.critical_batch_at(5) == math.inf  # KV reads outgrow the FLOPs
    row = line.table([40], [1])[0]
    assert row["step_ms"] == pytest.approx(800) and row["intensity_flop_per_byte"] == pytest.approx(10)
    assert rl.Roofline(100, 400, 10, device, chips=4).critical_batch == pytest.approx(20)
    # the KV pool in pages: (100_000 * 0.5 - 400) bytes / (10 bytes x 16 positions) = 310 pages
    sized = rl.Roofline(100, 400, 10, dataclasses.replace(device, memory_bytes=100_000))
    assert sized.kv_pages(16, memory_fraction=0.5) == 310
    # 40-token sequences take 3 pages each, 64-token ones 4: the pool holds 103 and 77 of them
    assert sized.sequences_held(40, 16, memory_fraction=0.5) == 103
    assert sized.max_slots(64, memory_fraction=0.5, page_size=16) == 77
    assert line.kv_pages(16) is None and line.sequences_held(40, 16) is None  # memory unknown


def test_presets_critical_batch_matches_performance_md():
    # shared/PERFORMANCE.md: TPU v5e bf16 ~240, H100 bf16 ~300 (bf16: 2 bytes per parameter)
    for name, expected in (("tpu_v5e", 240), ("h100", 300)):
        d = rl.preset(name)
        line = rl.Roofline(1_000_000, 2_000_000, 0, d)
        assert line.critical_batch == pytest.approx(d.peak_flops / d.bandwidth)
        assert line.critical_batch == pytest.approx(expected, rel=0.05)
    with pytest.raises(ValueError, match="h200"):
        rl.preset("a100")


def test_mbu_and_mfu_formulas():
    # (1 GB weights + 4 slots x 1 MB KV) per 10 ms step over 200 GB/s
    assert rl.mbu(1e9, 4, 1e6, 0.01, 2e11) == pytest.approx((1e9 + 4e6) / 0.01 / 2e11)
    assert rl.mfu(1e8, 100.0, 1e12) == pytest.approx(0.02)


def test_arrival_times():
    assert np.all(arrival_times(5, math.inf) == 0)
    t = arrival_times(20_000, rate=4.0, burstiness=1.0, seed=3)
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert np.mean(np.diff(t)) == pytest.approx(0.25, rel=0.05)
    assert np.array_equal(t, arrival_times(20_000, rate=4.0, burstiness=1.0, seed=3))
    # burstiness 0.25: the same mean gap, four times the variance of a Poisson process
    bursty = np.diff(arrival_times(20_000, rate=4.0, burstiness=0.25, seed=3))
    assert np.mean(bursty) == pytest.approx(0.25, rel=0.1)
    assert np.var(bursty) == pytest.approx(1 / (4.0**2 * 0.25), rel=0.2)  # gamma: 1 / (rate^2 * shape)
    with pytest.raises(ValueError):
        arrival_times(3, rate=0.0)


def test_prompt_sources(tmp_path):
    w2 = workloads.workload("w2")
    assert len(w2) == 64 and w2[5].messages[0]["content"] == "Write a short story about a robot number 5."
    assert all(p.max_tokens == 128 for p in w2)
    assert len(workloads.workload("w1")) == 1
    rand = workloads.random_token_prompts([3, 7], vocab_size=50, count=2, seed=1)
    assert [len(p.token_ids) for p in rand] == [3, 3, 7, 7]
    assert all(2 <= t < 50 for p in rand for t in p.token_ids)
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"id": "x", "token_ids": [5, 6], "max_tokens": 3}\n{"text": "raw"}\n')
    got = workloads.jsonl_prompts(str(path))
    assert got[0].messages == ({"role": "user", "content": "hi"},)
    assert (got[1].id, got[1].token_ids, got[1].max_tokens) == ("x", (5, 6), 3)
    assert got[2].text == "raw"
    path.write_text('{"prompt": "hi"}\n{"nothing": 1}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2"):
        workloads.jsonl_prompts(str(path))


def test_recommend_slots_rule():
    rows = [
        {"slots": 1, "fits": True, "tokens_per_s": 100.0, "tpot_p90_ms": 10.0},
        {"slots": 2, "fits": True, "tokens_per_s": 180.0, "tpot_p90_ms": 12.0},
        {"slots": 4, "fits": True, "tokens_per_s": 185.0, "tpot_p90_ms": 15.0},  # +3%: not worth it
        {"slots": 8, "fits": False},
    ]
    assert runner.recommend_slots(rows, min_gain=0.05, tpot_slo_ms=None) == 2
    assert runner.recommend_slots(rows, min_gain=0.0, tpot_slo_ms=None) == 4
    assert runner.recommend_slots(rows, min_gain=0.05, tpot_slo_ms=11.0) == 1
    assert runner.recommend_slots(rows, min_gain=0.05, tpot_slo_ms=1.0) is None
    runs = [{"rate": r, "summary": {"slo_attainment": a}} for r, a in ((1.0, 1.0), (4.0, 0.95), (16.0, 0.5))]
    assert runner.recommend_rate(runs, min_attainment=0.9) == 4.0
    assert runner.recommend_rate(runs, min_attainment=0.99) == 1.0


# ----- subcommands on the tiny model --------------------------------------------------------------------------------


def _read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def test_roofline_command(tmp_path):
    opts = tiny_options(device_spec=("tpu_v5e",))
    doc, path, pngs = runner.run_command("roofline", opts, str(tmp_path))
    assert _read(path) == doc
    assert doc["machine"]["versions"]["jax"] and doc["options"]["device_spec"] == ["tpu_v5e"]
    here, v5e = doc["figures"]["devices"]["this_device"], doc["figures"]["devices"]["tpu_v5e"]
    cfg = runner.model_config(opts)
    assert here["weight_bytes"] == cfg.num_params * 4
    assert here["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4  # K and V x layers x kv heads x head dim x f32
    assert here["critical_batch"] == pytest.approx(here["peak_tflop_s"] * 1e12 / (here["bandwidth_gb_s"] * 1e9) * 2)
    assert v5e["weight_bytes"] == cfg.num_params * 2 and v5e["critical_batch"] == pytest.approx(197e12 / 819e9)
    row = v5e["table"][0]
    assert (row["slots"], row["context"]) == (1, 64)
    assert row["step_ms"] == pytest.approx((cfg.num_params * 2 + 64 * v5e["kv_bytes_per_token"]) / 819e9 * 1e3)
    assert len(v5e["table"]) == 4 and all(os.path.getsize(p) > 0 for p in pngs)
    # this device, and v5e in bf16, with an int8 KV cache, int8 weights, and both
    assert len(pngs) == len(doc["figures"]["devices"]) == 5
    # int8 weights: one byte per linear / embedding weight, a float32 scale per output row, bf16 norms
    int8, kv_only, int8_kv = (doc["figures"]["devices"][f"tpu_v5e_int8_{s}"] for s in ("weights", "kv", "weights_kv"))
    d, f, v, n_layers = cfg.dim, cfg.mlp_dim, cfg.vocab_size, cfg.num_layers
    rows = n_layers * (cfg.num_heads * 16 + 2 * cfg.num_kv_heads * 16 + d + 2 * f + d) + v * (
        1 if cfg.tie_embeddings else 2
    )
    norms = (2 * n_layers + 1) * d
    assert int8["weight_bytes"] == (cfg.num_params - norms) + 4 * rows + 2 * norms
    assert int8["critical_batch"] == pytest.approx(v5e["critical_batch"] * int8["weight_bytes"] / v5e["weight_bytes"])
    assert int8["kv_bytes_per_token"] == v5e["kv_bytes_per_token"]
    # int8 KV: one byte per element plus a bfloat16 scale per token, kv head and layer for K and for V
    assert int8_kv["kv_bytes_per_token"] == kv_only["kv_bytes_per_token"] == 2 * 2 * 2 * 16 + 2 * 2 * 2 * 2
    assert kv_only["weight_bytes"] == v5e["weight_bytes"]


@pytest.mark.parametrize("attention", ["kernel", "xla"])
def test_latency_command(tmp_path, attention):
    doc, _, pngs = runner.run_command("latency", tiny_options(attention=attention), str(tmp_path))
    fig = doc["figures"]
    n_params, weight_bytes = fig["model"]["n_params"], fig["model"]["weight_bytes"]
    bandwidth, peak = fig["limits"]["bandwidth_gb_s"] * 1e9, fig["limits"]["peak_tflop_s"] * 1e12
    assert fig["model"]["attention"] == attention
    # The 8-token prompt's 8 decode steps attend to 9, 10, ..., 16 positions: the kernel reads those, XLA's
    # formulation the whole 64-token page every step.
    kv_tokens = {"kernel": (9 + 16) / 2, "xla": 64}[attention]
    kv_per_slot = kv_tokens * fig["model"]["kv_bytes_per_token"]
    assert [r["slots"] for r in fig["decode"]] == [1, 2]
    for r in fig["decode"]:
        step = r["step_ms"] / 1e3
        assert r["tokens_per_s"] == pytest.approx(r["slots"] / step)  # every dispatch was full
        assert r["kv_bytes_per_step"] == pytest.approx(r["slots"] * kv_per_slot)
        assert r["mbu"] == pytest.approx(rl.mbu(weight_bytes, r["slots"], kv_per_slot, step, bandwidth))
        assert r["mfu"] == pytest.approx(2 * n_params * r["tokens_per_s"] / peak)
    ttft = {r["prompt"]: r for r in fig["ttft"]}
    assert set(ttft) == {"random-8-0", "random-16-0"} and ttft["random-16-0"]["bucket"] == 16
    for r in fig["ttft"]:
        assert r["prefill_mfu"] == pytest.approx(2 * n_params * r["prompt_tokens"] / (r["ttft_ms"] / 1e3) / peak)
    assert fig["w1"]["decode_tokens_per_s"] == fig["decode"][0]["tokens_per_s"]
    assert "prefill" in fig["compile_seconds"] and "slots=2" in fig["compile_seconds"]
    assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 0


def test_throughput_command(tmp_path):
    doc, _, _ = runner.run_command("throughput", tiny_options(), str(tmp_path))
    m = doc["figures"]["meshserve"]
    assert m["prompts"] == 3 and m["prompt_tokens"] == 24 and m["failed"] == []
    assert m["exact_lengths"] and m["output_tokens"] == 3 * 9
    assert m["output_tokens_per_s"] == pytest.approx(m["output_tokens"] / m["wall_s"])
    assert m["tpot_ms"]["count"] == 3 and m["ttft_ms"]["count"] == 3
    assert "hf" not in doc["figures"]


def _tiny_hf_folder(path) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from engine.tokenizer import make_tiny_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(str(path))
    make_tiny_tokenizer().hf_tokenizer.save(str(path / "tokenizer.json"))


@pytest.mark.reference
def test_throughput_hf_baseline_same_weights(tmp_path, monkeypatch):
    folder = tmp_path / "hf"
    folder.mkdir()
    _tiny_hf_folder(folder)
    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    opts = tiny_options(random_model=None, checkpoint=str(folder), num_prompts=2, max_tokens=5, baseline="hf",
                        hf_batch_sizes=(2,))  # fmt: skip
    doc, _, _ = runner.run_command("throughput", opts, str(tmp_path / "out"))
    fig = doc["figures"]
    hf, ours = fig["hf"], fig["meshserve"]
    assert hf["output_tokens"] == ours["output_tokens"] == 2 * 5
    assert hf["best_batch_size"] == 2 and hf["transformers"]
    assert hf["output_tokens_per_s"] == pytest.approx(hf["output_tokens"] / hf["wall_s"])
    assert fig["speedup_vs_hf"] == pytest.approx(ours["output_tokens_per_s"] / hf["output_tokens_per_s"])
    assert hf["identical_outputs"] == 2  # same weights, same ids, greedy: the same tokens


def test_serve_command_keeps_failures(tmp_path):
    # every other request does not fit the context (60 + 9 tokens > 64): INVALID_ARGUMENT, kept with its status
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"token_ids": [5] * 8}) + "\n" + json.dumps({"token_ids": [5] * 60}) + "\n")
    opts = tiny_options(random_prompt_lens=(), prompts_file=str(prompts), num_prompts=None, num_requests=4,
                        request_rates=(200.0,), warmup_requests=1, seed=7, slo_ttft_ms=60_000.0)  # fmt: skip
    doc, _, pngs = runner.run_command("serve", opts, str(tmp_path / "out"))
    fig = doc["figures"]
    assert fig["target"] == "in-process" and fig["server"]["num_slots"] == 2
    (run,) = fig["runs"]
    s = run["summary"]
    assert run["seed"] == 7 and run["rate"] == 200.0 and len(run["records"]) == 4
    assert (s["requests"], s["completed"], s["failed"]) == (4, 2, 2)
    assert {f["status"] for f in s["failures"]} == {"INVALID_ARGUMENT"}
    ok = [r for r in run["records"] if r["status"] == "OK"]
    for r in ok:
        assert r["output_tokens"] == 9 and r["finish_reason"] == "length"
        assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1))
    assert s["requests_meeting_slo"] == 2 and s["goodput_requests_per_s"] == pytest.approx(2 / s["duration_s"])
    assert s["output_tokens_per_s"] == pytest.approx(18 / s["duration_s"])
    assert len(pngs) == 1


def test_serve_fixed_concurrency(tmp_path):
    opts = tiny_options(num_requests=3, concurrency=(2,), warmup_requests=0)
    doc, _, _ = runner.run_command("serve", opts, str(tmp_path), draw=False)
    (run,) = doc["figures"]["runs"]
    assert run["concurrency"] == 2 and run["rate"] is None
    assert run["summary"]["completed"] == 3 and run["summary"]["itl_ms"]["count"] == 3 * 8


def test_sweep_over_slots(tmp_path):
    doc, _, pngs = runner.run_command("sweep", tiny_options(slo_tpot_ms=60_000.0), str(tmp_path))
    fig = doc["figures"]
    assert [r["slots"] for r in fig["rows"]] == [1, 2] and all(r["fits"] for r in fig["rows"])
    assert fig["recommended_slots"] == runner.recommend_slots(fig["rows"], 0.05, 60_000.0)
    assert fig["recommended_slots"] in (1, 2)
    assert all(r["predicted_tokens_per_s"] > 0 for r in fig["rows"])
    assert len(pngs) == 1 and os.path.getsize(pngs[0]) > 0


def test_cli_writes_json(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "roofline", "--random_model=tiny",
           "--device_spec=h200", "--slot_counts=1,8", "--contexts=128", "--bandwidth_mb=16", "--matmul_n=256",
           f"--output_dir={tmp_path}", "--noplot", "--noprogress"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "critical batch" in out.stdout
    (name,) = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    doc = _read(str(tmp_path / name))
    assert doc["flags"]["device_spec"] == ["h200"] and doc["figures"]["devices"]["h200"]["chips"] == 1
    bad = subprocess.run([*cmd[:2], "nonsense"], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert bad.returncode != 0 and "usage" in bad.stderr
