"""The quality gate of int8 weights, an int8 KV cache and both on the bundled SmolLM2 (bench/quality.py): perplexity
on the corpus the repo ships, teacher-forced argmax agreement and logit error against the float32 engine, greedy
agreement over chat prompts. Margins, the same for each format (the README's quality table has the measured
figures): perplexity at most +2%, argmax agreement at least 93%, mean |logit error| at most 0.4. The int8 KV rows
read every K/V as the pool stores it (Transformer.kv_dtype; tests/test_kv_int8.py holds the engine's paged steps to
that forward).

The int8 engine runs the CPU int8 kernel where it builds (the XLA path computes the same function; tests/test_int8.py
holds them to each other)."""

from __future__ import annotations

import dataclasses

import pytest

from bench import quality
from engine.engine import Engine, EngineConfig
from engine.load import load_engine

pytestmark = pytest.mark.slow

CONFIG = EngineConfig(
    num_slots=1, max_seq_len=1024, max_prefill_len=1024, page_size=64, decode_steps=8, dtype="float32"
)
MAX_PERPLEXITY_RISE = 0.02
MIN_TOP1_AGREEMENT = 0.93
MAX_MEAN_LOGIT_ERROR = 0.4


@pytest.fixture(scope="module")
def results():
    f32, tokenizer = load_engine(None, dataclasses.replace(CONFIG, linear="xla"))
    engines = {"float32": f32} | {
        name: Engine(f32.model_config, f32.params, dataclasses.replace(CONFIG, **change))
        for name, change in quality.FORMATS.items()
    }
    out = quality.evaluate(engines, tokenizer, window=1024, stride=512)
    print("\n" + quality.table(out))
    return out


def test_corpus_is_a_few_thousand_tokens(results):
    assert 2500 <= results[0].scored_tokens <= 4000


@pytest.mark.parametrize("row", [1, 2, 3], ids=list(quality.FORMATS))
def test_int8_formats_hold_the_quality_margins(results, row):
    ref, int8 = results[0], results[row]
    assert ref.perplexity < 20, "the float32 model should read plain English and code well"
    assert int8.perplexity_ratio(ref) - 1 <= MAX_PERPLEXITY_RISE, quality.table(results)
    assert int8.top1_agreement >= MIN_TOP1_AGREEMENT, quality.table(results)
    assert int8.mean_logit_error <= MAX_MEAN_LOGIT_ERROR, quality.table(results)
    # not the float32 model under another name: the rounding is visible
    assert int8.max_logit_error > 0.01 and int8.perplexity != ref.perplexity
