"""The model families beyond Llama/Qwen2, each checked against HF transformers on a tiny random model written to
disk: Qwen3 (q/k norms, free head_dim), Mistral (sliding window), Gemma 2 (sandwich norms, +1 norm offset,
embedding scaling, GeGLU, attention and final soft-capping, query_pre_attn_scalar, alternating sliding/global
layers) and Gemma 3 text (q/k norms, a local RoPE base, linear RoPE scaling on global layers) - through the real
HF-folder loader, the model's full forward, and the engine's chunked, packed, prefix-sharing prefill + decode with
prompts that cross the sliding window and several pages."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import orbax_io
from checkpoints.errors import CheckpointError
from checkpoints.hf import load_hf_folder
from engine import kernels
from engine.attention import paged_attend_xla
from engine.config import ModelConfig, UnsupportedModelError, tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import Transformer, unstack_layers
from engine.placement import choose_attention
from engine.sampling import SamplingParams
from engine.tokenizer import make_tiny_tokenizer
from sharding.rules import DEFAULT_RULES, single_device_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.reference

WINDOW = 8
PAGE = 4  # prompts of ~40 tokens cross ten pages and five windows
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
_GEMMA = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, tie_word_embeddings=True)

CASES = {
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(num_hidden_layers=2, head_dim=24, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_hidden_layers=2, sliding_window=WINDOW, rope_theta=10000.0, tie_word_embeddings=False),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_hidden_layers=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **_GEMMA),
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=4,
            sliding_window_pattern=2,
            final_logit_softcapping=3.0,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            **_GEMMA,
        ),
    ),
}


def _hf_model(name: str):
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        # weights large enough that scores and logits reach the soft caps, and norm weights far from their
        # initial values, so a missing cap, offset or norm cannot pass unnoticed
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "norm" in pname else 0.15)
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    model = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    cfg, stacked = load_hf_folder(path)
    return request.param, model, cfg, unstack_layers(stacked, cfg.num_layers)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    # no eos at all: min_new_tokens would instead forbid the eos id, which the engine's ignore_eos still picks
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_config_read_from_hf(hf_case):
    name, model, cfg, _ = hf_case
    hf = model.config
    assert cfg.qk_norm == (name in ("qwen3", "gemma3"))
    assert cfg.head_dim == (24 if name == "qwen3" else 16)
    gemma = name.startswith("gemma")
    assert cfg.norm_offset == cfg.sandwich_norms == cfg.scale_embeddings == gemma
    assert cfg.mlp_activation == ("gelu_tanh" if gemma else "silu")
    assert cfg.query_pre_attn_scalar == (24 if gemma else None)
    assert cfg.attn_logit_softcap == (2.0 if name == "gemma2" else None)
    assert cfg.final_logit_softcap == (3.0 if gemma else None)
    if name == "qwen3":
        assert cfg.sliding_window is None and cfg.sliding_layers == ()
    else:
        assert cfg.sliding_window == WINDOW
        types = getattr(hf, "layer_types", None) or ["sliding_attention"] * cfg.num_layers  # Mistral: every layer
        assert cfg.sliding_layers == tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if name == "gemma3":
        assert cfg.sliding_layers == (0, 2)
        assert cfg.rope_local_theta == 100.0 and cfg.rope_theta == 1e6
        assert cfg.rope_scaling.kind == "linear" and cfg.rope_scaling.factor == 2.0
    assert ModelConfig.from_json(cfg.to_json()) == cfg  # what an orbax checkpoint stores beside itself


def test_full_forward_matches_transformers(hf_case):
    _, model, cfg, params = hf_case
    # 60 positions: seven windows, where a sliding layer that saw too much (or too little) would differ
    ids = list(np.random.RandomState(1).randint(2, cfg.vocab_size, size=60))
    ours, _ = Transformer(cfg, jnp.float32).apply({"params": params}, jnp.array([ids]), jnp.arange(60)[None])
    np.testing.assert_allclose(np.asarray(ours[0]), _hf_logits(model, ids), atol=2e-4, rtol=0)


def _engine(cfg, params, dtype="float32", **overrides) -> Engine:
    config = dict(
        num_slots=2,
        max_seq_len=96,
        max_prefill_len=16,
        page_size=PAGE,
        decode_steps=4,
        dtype=dtype,
        attention="auto",
        linear="xla",
    )
    config.update(overrides)
    return Engine(cfg, params, EngineConfig(**config))


def _engine_greedy(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """Greedy continuations of `prompts`, prefilled in one batch (packed, chunked, sharing cached prefixes)."""
    prefixes = engine.prefill_batch([(p, SamplingParams(max_tokens=n, ignore_eos=True), 0) for p in prompts])
    out = []
    for slot, prefix in enumerate(prefixes):
        engine.insert(prefix, slot)
        out.append([prefix.token])
    while any(len(t) < n for t in out):
        step = engine.generate()
        for slot, tokens in enumerate(out):
            tokens += [int(t) for t in step.tokens[step.valid[:, slot], slot]]
    return [t[:n] for t in out]


def test_engine_greedy_matches_transformers(hf_case, caplog):
    _, model, cfg, params = hf_case
    rng = np.random.RandomState(2)
    # 37 tokens: three prefill chunks of at most 16, each reading the earlier ones' pages through the window; the
    # second prompt shares the first's opening 21 tokens, so it starts from the first's cached pages (five shared,
    # one copied; see engine.prefill.ready) and reads them through the window
    first = list(rng.randint(2, cfg.vocab_size, size=37))
    second = first[:21] + list(rng.randint(2, cfg.vocab_size, size=6))
    # the packed-weight CPU kernel where the model's MLP is SwiGLU and a compiler can build it (its q/k norms and
    # windows run beside it)
    linear = "kernel" if cfg.mlp_activation == "silu" and kernels.compiler() is not None else "xla"
    with caplog.at_level(logging.INFO, logger="engine.placement"):
        engine = _engine(cfg, params, linear=linear)
    assert engine.linear == linear
    if cfg.sliding_layers or cfg.attn_logit_softcap:
        assert engine.attention == "xla"
        assert any("the kernels lack" in r.getMessage() for r in caplog.records)
    ours = _engine_greedy(engine, [first, second], 24)
    assert ours == [_hf_greedy(model, first, 24), _hf_greedy(model, second, 24)]


@pytest.mark.parametrize("attention", ["kernel", "pallas"])
def test_kernel_refused_for_sliding_window(attention):
    cfg = tiny_config(vocab_size=128, num_layers=2, sliding_window=WINDOW, sliding_layers=(0,))
    engine_config = EngineConfig(num_slots=2, max_seq_len=128, max_prefill_len=16, dtype="float32", attention=attention)
    with pytest.raises(ValueError, match=f"attention='{attention}' cannot be used here: this model has sliding-window"):
        choose_attention(cfg, engine_config, jnp.float32, single_device_mesh(), DEFAULT_RULES)
    capped = dataclasses.replace(tiny_config(), attn_logit_softcap=2.0)
    with pytest.raises(ValueError, match="this model has attention logit soft-capping"):
        choose_attention(capped, engine_config, jnp.float32, single_device_mesh(), DEFAULT_RULES)


def test_windowed_decode_reads_only_its_pages():
    """The decode attention of a sliding layer gathers ceil(window / P) + 1 pages from a per-slot start, and gives
    what attending over the whole table with the window masked gives; pages outside the window hold NaN, which
    would poison the result if they were read unmasked."""
    rng = np.random.RandomState(0)
    b, k, g, h, w = 3, 2, 2, 8, 12
    pool_pages = 1 + b * w
    k_pool = rng.randn(pool_pages, k, h, PAGE).astype(np.float32)
    v_pool = rng.randn(pool_pages, k, PAGE, h).astype(np.float32)
    table = 1 + np.arange(b * w, dtype=np.int32).reshape(b, w)
    lengths = np.array([3, 25, 47], np.int32)
    q = rng.randn(b, k, g, h).astype(np.float32)
    got = paged_attend_xla(jnp.array(q), jnp.array(k_pool), jnp.array(v_pool), table, lengths, window=WINDOW)
    # reference: every position, softmax over (length - window, length] only
    for s in range(b):
        keys = k_pool[table[s]].transpose(1, 0, 3, 2).reshape(k, w * PAGE, h)  # [K, S, H]
        vals = v_pool[table[s]].transpose(1, 0, 2, 3).reshape(k, w * PAGE, h)
        lo, hi = max(0, lengths[s] - WINDOW + 1), lengths[s] + 1
        scores = np.einsum("KGH,KSH->KGS", q[s], keys[:, lo:hi])
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(np.asarray(got[s]), np.einsum("KGS,KSH->KGH", p, vals[:, lo:hi]), atol=1e-5)
    # poison every page outside each slot's window: the result must not change
    poisoned_k, poisoned_v = k_pool.copy(), v_pool.copy()
    for s in range(b):
        lo, hi = max(0, lengths[s] - WINDOW + 1) // PAGE, lengths[s] // PAGE
        outside = [p for i, p in enumerate(table[s]) if not lo <= i <= hi]
        poisoned_k[outside] = np.nan
        poisoned_v[outside] = np.nan
    again = paged_attend_xla(jnp.array(q), jnp.array(poisoned_k), jnp.array(poisoned_v), table, lengths, window=WINDOW)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(got))
    # the gathered keys are [B, span, K, H, P] with span = ceil(window / P) + 1 pages, never the whole table's W
    jaxpr = str(jax.make_jaxpr(lambda *a: paged_attend_xla(*a, window=WINDOW))(q, k_pool, v_pool, table, lengths))
    span = -(-WINDOW // PAGE) + 1
    assert f"f32[{b},{span},{k},{h},{PAGE}]" in jaxpr and f"f32[{b},{w},{k},{h},{PAGE}]" not in jaxpr


def test_bfloat16_agrees_with_float32(tmp_path):
    """Gemma 3 (the family with the most features) in bfloat16 on the XLA path against float32: the last prompt
    token's logits lie within 0.1 (bf16 keeps 8 bits of mantissa; these logits are capped at 3), and each token the
    bf16 engine picks greedily is, by the float32 model fed the same sequence, within 0.1 of the best logit (a
    random model has near ties, which bf16 may break the other way; exact agreement would test luck)."""
    model = _hf_model("gemma3")
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg, stacked = load_hf_folder(tmp_path)
    params = unstack_layers(stacked, cfg.num_layers)
    prompt = list(np.random.RandomState(3).randint(2, cfg.vocab_size, size=20))
    n = 12

    def forward(dtype, ids):
        cast = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        logits, _ = Transformer(cfg, dtype).apply({"params": cast}, jnp.array([ids]), jnp.arange(len(ids))[None])
        return np.asarray(logits[0])

    bf16_params = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    tokens = _engine_greedy(_engine(cfg, bf16_params, dtype="bfloat16", num_slots=1), [prompt], n)[0]
    f32 = forward(jnp.float32, prompt + tokens)
    np.testing.assert_allclose(forward(jnp.bfloat16, prompt)[-1], f32[len(prompt) - 1], atol=0.1, rtol=0)
    reference = f32[len(prompt) - 1 : -1]  # [n, V]: the logits each generated token answers
    chosen = reference[np.arange(n), tokens]
    np.testing.assert_array_less(reference.max(axis=-1) - chosen, 0.1)


# config.json of two published checkpoints as the Hub serves them (written before transformers 5: no layer_types, a
# sliding_window_pattern or none, Gemma 3's local RoPE base at the top level), with their published parameter counts.
_HUB_CONFIGS = {
    "gemma-2-2b": (
        dict(
            architectures=["Gemma2ForCausalLM"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            head_dim=256,
            hidden_act="gelu_pytorch_tanh",
            hidden_activation="gelu_pytorch_tanh",
            hidden_size=2304,
            intermediate_size=9216,
            max_position_embeddings=8192,
            num_attention_heads=8,
            num_hidden_layers=26,
            num_key_value_heads=4,
            query_pre_attn_scalar=256,
            rms_norm_eps=1e-06,
            rope_theta=10000.0,
            sliding_window=4096,
            vocab_size=256000,
        ),
        2_614_341_888,
    ),
    "gemma-3-1b": (
        dict(
            architectures=["Gemma3ForCausalLM"],
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            hidden_size=1152,
            intermediate_size=6912,
            max_position_embeddings=32768,
            num_attention_heads=4,
            num_hidden_layers=26,
            num_key_value_heads=1,
            query_pre_attn_scalar=256,
            rms_norm_eps=1e-06,
            rope_local_base_freq=10000,
            rope_scaling=None,
            rope_theta=1000000,
            sliding_window=512,
            sliding_window_pattern=6,
            vocab_size=262144,
        ),
        999_885_952,
    ),
}


@pytest.mark.parametrize("name", sorted(_HUB_CONFIGS))
def test_hub_config_without_layer_types(name):
    hub, params = _HUB_CONFIGS[name]
    cfg = ModelConfig.from_hf_config(hub)
    assert cfg.num_params == params
    assert cfg.tie_embeddings and cfg.norm_offset and cfg.sandwich_norms and cfg.mlp_activation == "gelu_tanh"
    if name == "gemma-2-2b":  # every other layer slides, starting with the first
        assert cfg.sliding_window == 4096 and cfg.sliding_layers == tuple(range(0, 26, 2))
        assert (cfg.attn_logit_softcap, cfg.final_logit_softcap, cfg.rope_local_theta) == (50.0, 30.0, None)
    else:  # five sliding layers, then a global one
        assert cfg.sliding_window == 512 and cfg.sliding_layers == tuple(i for i in range(26) if i % 6 != 5)
        assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 1e4, None)
        assert cfg.qk_norm and cfg.attn_logit_softcap is None


def test_orbax_round_trip(tmp_path):
    """A converted Gemma 3 checkpoint stores every feature in its config and every new weight (q/k and sandwich
    norms) in its tree."""
    model = _hf_model("gemma3")
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    cfg, stacked = load_hf_folder(tmp_path / "hf")
    orbax_io.save_checkpoint(
        tmp_path / "out", cfg, stacked, make_tiny_tokenizer()
    )  # the tokenizer is stored, not checked
    assert orbax_io.load_config(tmp_path / "out") == cfg
    abstract = orbax_io.abstract_params(tmp_path / "out")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    restored = orbax_io.restore_params(tmp_path / "out", target)
    assert {"q_norm", "k_norm", "post_attn_norm", "post_mlp_norm"} <= set(restored["layers"])
    jax.tree.map(np.testing.assert_array_equal, restored, stacked)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"architectures": ["Gemma3ForConditionalGeneration"]},
            "the vision tower is not supported; text-only Gemma3ForCausalLM is",
        ),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
        ({"layer_types": ["chunked_attention", "full_attention"]}, "layer types \\['chunked_attention'\\]"),
        ({"hidden_act": "relu"}, "MLP activation 'relu' is not supported"),
    ],
)
def test_unsupported_architecture_named_in_one_line(tmp_path, change, message):
    config = {
        "architectures": ["MistralForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "sliding_window": WINDOW,
        **change,
    }
    with pytest.raises(UnsupportedModelError, match=message) as raised:
        ModelConfig.from_hf_config(config)
    assert "\n" not in str(raised.value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):  # the loader names the file and the same reason
        load_hf_folder(tmp_path)


def test_param_counts_match_transformers(hf_case):
    _, model, cfg, _ = hf_case
    assert cfg.num_params == sum(p.numel() for p in model.parameters())


# A child process (XLA fixes the CPU device count when jax starts; see tests/test_sharding.py): a Gemma-2-like
# random model (every attention feature: sliding and global layers, soft-capping, q/k and sandwich norms) on a
# forced 4-device mesh (slots over data, heads over tensor) against one device, greedy over a prompt longer than
# its window.
_MESH_CHILD = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import init_params
from engine.sampling import SamplingParams
from sharding.mesh import make_mesh
from sharding.rules import single_device_mesh

cfg = tiny_config(vocab_size=128, num_layers=2, sliding_window=8, sliding_layers=(0,), qk_norm=True,
                  norm_offset=True, sandwich_norms=True, scale_embeddings=True, mlp_activation="gelu_tanh",
                  query_pre_attn_scalar=24.0, attn_logit_softcap=2.0, final_logit_softcap=3.0)
# weights large enough that logits spread well beyond float rounding (no near ties between meshes)
params = jax.tree.map(lambda a: a * 8.0, init_params(cfg, jnp.float32, seed=1))
config = EngineConfig(num_slots=2, max_seq_len=64, max_prefill_len=16, page_size=4, decode_steps=4,
                      dtype="float32", linear="xla")
prompts = [list(range(2, 32)), list(range(40, 61))]
out = {}
for name, mesh in (("single", single_device_mesh()), ("data:2,tensor:2", make_mesh("data:2,tensor:2", jax.devices()))):
    engine = Engine(cfg, params, config, mesh=mesh)
    prefixes = engine.prefill_batch([(p, SamplingParams(max_tokens=12, ignore_eos=True), 0) for p in prompts])
    tokens = []
    for slot, prefix in enumerate(prefixes):
        engine.insert(prefix, slot)
        tokens.append([prefix.token])
    while any(len(t) < 12 for t in tokens):
        step = engine.generate()
        for slot, t in enumerate(tokens):
            t += [int(x) for x in step.tokens[step.valid[:, slot], slot]]
    out[name] = {"tokens": [t[:12] for t in tokens], "attention": engine.attention}
json.dump(out, sys.stdout)
"""


def test_sliding_window_model_on_a_forced_mesh():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", _MESH_CHILD], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    assert out["data:2,tensor:2"]["attention"] == "xla"
    assert out["data:2,tensor:2"]["tokens"] == out["single"]["tokens"]
    assert len(set(out["single"]["tokens"][0])) > 1  # a model that repeats one token would agree trivially
