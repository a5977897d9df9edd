"""Model features beyond SmolLM2, each checked against HF transformers on a tiny random model written to disk:
Llama-3 rope scaling with untied embeddings, Qwen2's q/k/v bias, and tied embeddings - through the real HF-folder
loader, the model's full forward, and the engine's prefill + decode."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.hf import load_hf_folder
from engine.engine import Engine, EngineConfig
from engine.model import Transformer, unstack_layers
from engine.sampling import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.reference

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=1,
)

CASES = {
    "llama3-rope-untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "qwen2-qkv-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=10000.0, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    config_cls, model_cls, extra = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**_COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random biases, so a dropped bias cannot pass unnoticed
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    cfg, stacked = load_hf_folder(path)
    return request.param, model, cfg, unstack_layers(stacked, cfg.num_layers)


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_config_read_from_hf(hf_case):
    name, _, cfg, _ = hf_case
    assert cfg.tie_embeddings == (name == "llama-tied")
    assert cfg.qkv_bias == (name == "qwen2-qkv-bias")
    assert (cfg.rope_scaling is not None) == (name == "llama3-rope-untied")


def test_full_forward_matches_transformers(hf_case):
    _, model, cfg, params = hf_case
    # 100 positions: past original_max_position_embeddings (32), where llama3 scaling changes the frequencies
    ids = list(np.random.RandomState(1).randint(2, cfg.vocab_size, size=100))
    ours, _ = Transformer(cfg, jnp.float32).apply({"params": params}, jnp.array([ids]), jnp.arange(100)[None])
    np.testing.assert_allclose(np.asarray(ours[0]), _hf_logits(model, ids), atol=2e-4, rtol=0)


def test_engine_greedy_matches_transformers(hf_case):
    _, model, cfg, params = hf_case
    engine = Engine(
        cfg,
        params,
        EngineConfig(num_slots=2, max_seq_len=128, max_prefill_len=32, page_size=32, decode_steps=4, dtype="float32"),
    )
    prompt = list(np.random.RandomState(2).randint(2, cfg.vocab_size, size=20))
    prefix = engine.prefill(prompt, SamplingParams(max_tokens=40, ignore_eos=True), seed=0)
    engine.insert(prefix, 1)
    tokens = [prefix.token]
    while len(tokens) < 40:
        out = engine.generate()
        tokens += [int(t) for t in out.tokens[out.valid[:, 1], 1]]
    with torch.no_grad():
        hf = model.generate(
            torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=1
        )
    assert tokens == hf[0, len(prompt) :].tolist()
