"""The llama.cpp baseline (bench/llamacpp_baseline.py): the GGUFs it writes, its arithmetic, the benchmark's error
without llama.cpp, and, where scripts/install_llamacpp.sh has made the llama.cpp venv, that llama.cpp on the F32 file
greedily picks the tokens meshserve's float32 engine picks: the file holds the same model.

The GGUF tests need only the `gguf` package and run everywhere; the llama.cpp ones are skipped without its venv
(CI does not build it).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from bench import llamacpp_baseline as lb  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D, F, V = 64, 96, 8


def _tiny_gguf(path, *, untied: bool = False) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF whose tensors are quantized like the bundled file's (Q8_0 embedding, Q4_1 matrices,
    F32 norms) plus an F16 one, with tokenizer arrays of each kind; returns the float32 values each tensor holds."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e5)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    w.add_custom_alignment(64)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_types([3] + [1] * (V - 1))
    w.add_token_merges(["t 0", "t 1"])
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_chat_template("{{ messages }}")
    kinds = {
        "token_embd.weight": ((V, D), gguf.GGMLQuantizationType.Q8_0),
        "blk.0.attn_norm.weight": ((D,), gguf.GGMLQuantizationType.F32),
        "blk.0.attn_q.weight": ((D, D), gguf.GGMLQuantizationType.Q4_1),
        "blk.0.ffn_down.weight": ((D, F), gguf.GGMLQuantizationType.Q4_1),
        "blk.0.ffn_up.weight": ((F, D), gguf.GGMLQuantizationType.F16),
        "output_norm.weight": ((D,), gguf.GGMLQuantizationType.F32),
    }
    if untied:
        kinds["output.weight"] = ((V, D), gguf.GGMLQuantizationType.Q8_0)
    values = {}
    for name, (shape, qtype) in kinds.items():
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        values[name] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    # what the file holds, read back as meshserve's loader reads it
    reader = gguf.GGUFReader(str(path))
    return {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        for t in reader.tensors
    }


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("variant", ["f32", "f16", "q8_0"])
def test_write_gguf_keeps_metadata_and_weights(tmp_path, variant):
    source, dest = tmp_path / "tiny.gguf", tmp_path / f"tiny-{variant}.gguf"
    held = _tiny_gguf(source)
    lb.write_gguf(str(source), str(dest), variant)
    before, after = _fields(source), _fields(dest)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    assert after.pop("general.file_type") == int(file_type.get(variant, gguf.LlamaFileType.MOSTLY_Q8_0))
    assert before.pop("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q4_1)
    assert after == before  # tokenizer arrays, chat template, rope, alignment: every other key unchanged
    reader = gguf.GGUFReader(str(dest))
    assert [t.name for t in reader.tensors] == list(held)
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        want = held[t.name]
        assert got.shape == want.shape, t.name
        if want.ndim == 1 or variant == "f32":
            # norms stay F32 in every variant; the F32 file holds exactly the values meshserve computes with
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        elif variant == "f16":
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
            # Q8_0: one f16 scale d = max |x| / 127 per 32 values; each value within half a step, plus the scale's
            # f16 rounding (2^-11 relative) times at most 127 steps: 0.5 d + 127 d 2^-11 < 0.57 d
            step = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=-1, keepdims=True) / 127
            err = np.abs(got - want).reshape(step.shape[0], -1, 32)
            assert (err <= step * 0.57 + 1e-6).all(), t.name


def test_gguf_facts_count_weight_bytes_per_token(tmp_path):
    tied, untied = tmp_path / "tied.gguf", tmp_path / "untied.gguf"
    _tiny_gguf(tied)
    _tiny_gguf(untied, untied=True)
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(untied)).tensors}
    facts = lb.gguf_facts(str(tied))
    # tied: the embedding is the output head, read whole every token
    assert facts["weight_bytes_per_token"] == sum(v for k, v in sizes.items() if k != "output.weight")
    assert facts["kv_elements_per_token"] == 2 * 1 * 1 * (D // 2)  # K and V x layers x kv heads x head dim
    assert facts["tensor_types"] == {"Q8_0": 1, "F32": 2, "Q4_1": 2, "F16": 1}
    # untied: the head is its own tensor and the embedding is read one row (of V) per token
    embed = sizes["token_embd.weight"]
    assert lb.gguf_facts(str(untied))["weight_bytes_per_token"] == sum(sizes.values()) - embed + embed // V


def test_comparison_gguf_is_cached_and_named_by_source(tmp_path):
    source = tmp_path / "tiny.gguf"
    _tiny_gguf(source)
    cache = str(tmp_path / "cache")
    assert lb.comparison_gguf(str(source), "shipped", cache) == str(source)
    path = lb.comparison_gguf(str(source), "f16", cache)
    assert path.startswith(cache) and path.endswith(".F16.gguf")
    mtime = os.stat(path).st_mtime_ns
    assert lb.comparison_gguf(str(source), "f16", cache) == path and os.stat(path).st_mtime_ns == mtime
    assert os.listdir(cache) == [os.path.basename(path)]  # no partial file left behind
    os.utime(source, ns=(mtime + 10**9, mtime + 10**9))  # an edited source gets a fresh file
    assert lb.comparison_gguf(str(source), "f16", cache) != path
    with pytest.raises(ValueError, match=r"unknown llama\.cpp variant"):
        lb.comparison_gguf(str(source), "q4_k", cache)


def test_source_gguf_and_missing_venv(tmp_path):
    with pytest.raises(ValueError, match="needs a GGUF checkpoint"):
        lb.source_gguf(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"install_llamacpp\.sh"):
        lb.venv_python(str(tmp_path / "no-venv"))


def test_decode_mbu_hand_computed():
    # 10 steps of 100 weight bytes plus 50 positions of 4 bytes, in 1 s, over 2,000 B/s: (1000 + 200) / 2000
    assert lb.decode_mbu(100, 4, 50, 10, 1.0, 2000.0) == pytest.approx(0.6)
    assert lb.decode_mbu(100, 4, 50, 10, 1.0, None) is None


def test_benchmark_names_the_install_script_when_llamacpp_is_missing(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "benchmark.py"), "latency", "--llamacpp=f32",
           f"--llamacpp_venv={tmp_path / 'absent'}", f"--output_dir={tmp_path}", "--noplot"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: llama.cpp venv {tmp_path / 'absent'} is missing; run `bash scripts/install_llamacpp.sh` "
        "(or set --llamacpp_venv)"
    )
    assert not any(n.endswith(".json") for n in os.listdir(tmp_path))  # refused before anything ran


def test_benchmark_rows_and_ratios():
    from scripts import benchmark

    row = {"variant": "f16", "tensor_types": {"F16": 211, "F32": 61}, "load_average_1m": [0.1, 0.3]}
    llamacpp = {"threads": 2, "rows": [{**row, "ttft_ms": 80.0, "decode_tokens_per_s": 50.0, "mbu": 0.5}]}
    w1 = {"w1": {"ttft_ms": 100.0, "decode_tokens_per_s": 100.0, "mbu": 0.5}}
    fig = benchmark.with_llamacpp("latency", w1, llamacpp)
    # above 1: meshserve ahead (twice the decode speed; its TTFT 100 ms against 80 is 0.8x the speed)
    assert fig["vs_llamacpp"] == [{"variant": "f16", "decode_tokens_per_s": 2.0, "ttft_speedup": 0.8}]
    (line,) = benchmark.llamacpp_headline("latency", fig)
    assert line == (
        "llama.cpp f16 (F16/F32, 2 threads, load 0.1/0.3): TTFT 80.0 ms, decode 50.0 tok/s, MBU 50.0%; "
        "meshserve / llama.cpp decode = 2.00x"
    )
    w2 = {"meshserve": {"output_tokens_per_s": 600.0}}
    llamacpp["rows"] = [{**row, "output_tokens_per_s": 300.0, "wall_s": 27.3, "prefill_s": 2.0, "mbu": None}]
    fig = benchmark.with_llamacpp("throughput", w2, llamacpp)
    assert fig["vs_llamacpp"] == [{"variant": "f16", "output_tokens_per_s": 2.0}]
    assert benchmark.llamacpp_headline("throughput", fig)[0].endswith(
        "300.0 tok/s, wall 27.30 s (prefill 2.00 s), decode MBU n/a; meshserve / llama.cpp = 2.00x"
    )


# ----- with llama.cpp (scripts/install_llamacpp.sh) ---------------------------------------------------------------

VENV = lb.default_venv()
needs_llamacpp = pytest.mark.skipif(
    not os.path.isfile(os.path.join(VENV, "bin", "python")),
    reason=f"no llama.cpp venv at {VENV}: run `bash scripts/install_llamacpp.sh` (CI does not build llama.cpp)",
)
W1_TOKENS = 8
AGREE = W1_TOKENS
"""Leading greedy tokens that must agree. The same float32 weights give the same argmax: on the W1 prompt all 128
tokens agreed (2026-12-05, F32 with f32 and f16 KV, and F16); llama.cpp sums in another order, so a near-tie could
part them late, never within the first few."""


@pytest.fixture(scope="module")
def bundled_f32():
    """(meshserve's float32 engine, its tokenizer, the F32 GGUF of the same weights, the bundled file)."""
    from engine.engine import EngineConfig
    from engine.load import load_engine

    try:
        source = lb.source_gguf(None)
    except Exception as exc:  # CheckpointError: the bundled package is absent
        pytest.skip(str(exc))
    config = EngineConfig(num_slots=2, max_seq_len=256, max_prefill_len=256, page_size=64, dtype="float32")
    engine, tokenizer = load_engine(None, config)
    return engine, tokenizer, lb.comparison_gguf(source, "f32"), source


def _meshserve_greedy(engine, tokenizer, ids: list[int], n: int) -> list[int]:
    from engine.offline import OfflineItem, run_offline
    from engine.sampling import SamplingParams
    from engine.scheduler import Scheduler

    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    (result,) = run_offline(Scheduler(engine, tokenizer), [OfflineItem("w1", params, token_ids=ids)])
    assert result.error is None, result.error
    return result.token_ids


def _spec(path: str, workload: str, prompts, n: int, **extra) -> dict:
    facts = lb.gguf_facts(path)
    return {
        "model": path,
        "workload": workload,
        "prompts": prompts,
        "max_tokens": n,
        "repeats": 1,
        "threads": len(os.sched_getaffinity(0)),
        "weight_bytes_per_token": facts["weight_bytes_per_token"],
        "kv_elements_per_token": facts["kv_elements_per_token"],
        "bandwidth": 20e9,
        **extra,
    }


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_f32_gguf_greedy_matches_meshserve_float32(bundled_f32):
    from bench import workloads

    engine, tokenizer, f32, _ = bundled_f32
    ids = workloads.encode(workloads.workload("w1")[0], tokenizer)
    ours = _meshserve_greedy(engine, tokenizer, ids, W1_TOKENS)
    python = lb.venv_python(VENV)
    # an f32 KV cache, as meshserve's float32 engine keeps: only the summation order differs
    theirs = lb.run(python, _spec(f32, "w1", [ids], W1_TOKENS, kv_type="f32"), timeout=600)
    assert theirs["prompt_tokens"] == len(ids) and len(theirs["tokens"]) == W1_TOKENS
    assert theirs["tokens"][:AGREE] == ours[:AGREE], (theirs["tokens"], ours)
    assert theirs["ttft_ms"] > 0 and theirs["decode_tokens_per_s"] > 0 and theirs["mbu"] > 0
    assert theirs["context"]["model_size_bytes"] == lb.gguf_facts(f32)["weight_bytes_per_token"]


@pytest.mark.slow
@needs_llamacpp
def test_llamacpp_w2_batched_matches_one_at_a_time(bundled_f32):
    """The W2 path (every prompt a sequence of one batch) gives each prompt the tokens it gets alone, on the F16
    file with llama.cpp's default KV cache, and on the shipped file."""
    from bench import workloads

    _, tokenizer, _, source = bundled_f32
    prompts = [workloads.encode(p, tokenizer) for p in workloads.workload("w2")[:3]]
    python = lb.venv_python(VENV)
    for path in (lb.comparison_gguf(source, "f16"), source):
        batched = lb.run(python, _spec(path, "w2", prompts, 4, n_batch=64), timeout=600)
        assert batched["prompts"] == 3 and batched["output_tokens"] == 12 and batched["wall_s"] > 0
        for ids, tokens in zip(prompts, batched["tokens"], strict=True):
            alone = lb.run(python, _spec(path, "w1", [ids], 4), timeout=600)
            assert tokens[:3] == alone["tokens"][:3], (path, tokens, alone["tokens"])


@pytest.mark.slow
@needs_llamacpp
def test_w1_session_alternates_passes_with_the_one_shot_tokens(bundled_f32):
    """The long-lived llama.cpp process (`W1Session`, what the benchmark's alternating rounds use) answers each
    pass with the tokens the one-shot run gives, and a process that dies says so."""
    from bench import workloads

    _, tokenizer, f32, _ = bundled_f32
    ids = workloads.encode(workloads.workload("w1")[0], tokenizer)
    python = lb.venv_python(VENV)
    once = lb.run(python, _spec(f32, "w1", [ids], W1_TOKENS), timeout=600)
    with lb.W1Session(python, _spec(f32, "w1", [ids], W1_TOKENS)) as session:
        passes = [session.run() for _ in range(2)]
        for p in passes:
            assert p["tokens"] == once["tokens"]
            assert p["decode_tokens_per_s"] == pytest.approx((W1_TOKENS - 1) / p["decode_s"])
        session._proc.kill()
        session._proc.wait()
        with pytest.raises(RuntimeError, match="baseline stopped"):
            session.run()
    with pytest.raises(RuntimeError, match="did not start"):
        lb.W1Session(python, {**_spec(f32, "w1", [ids], W1_TOKENS), "model": f32 + ".missing"})


def test_alternating_rounds_headline():
    from scripts import benchmark

    paired = {
        "rounds": 3,
        "decode_tokens_per_s": [
            {"meshserve none": 80.0, "llama.cpp f32": 100.0},
            {"llama.cpp f32": 70.0, "meshserve none": 77.0},
            {"meshserve none": 90.0, "llama.cpp f32": 90.0},
        ],
        "ratios": [{"meshserve": "none", "variant": "f32", "median_ratio": 1.0, "ratios": [0.8, 1.1, 1.0]}],
    }
    assert benchmark.llamacpp_rounds_headline(paired) == [
        "alternating rounds, meshserve none: median 80.0 tok/s (77.0-90.0)",
        "alternating rounds, llama.cpp f32: median 90.0 tok/s (70.0-100.0)",
        "alternating rounds, meshserve none / llama.cpp f32 decode: median 1.000x over 3 rounds (0.80-1.10)",
    ]
