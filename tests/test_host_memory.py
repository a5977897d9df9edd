"""engine.host_memory: weights copied into one 2 MiB-page mapping on CPU, served by arrays that alias it; and an
engine on such weights decoding the same tokens as one without."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import host_memory
from engine.api import EngineConfig
from engine.config import tiny_config
from engine.engine import Engine
from engine.model import init_params
from engine.sampling import SamplingParams

needs_thp = pytest.mark.skipif(
    not host_memory.huge_pages_available(), reason="this kernel gives no transparent huge pages"
)


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_arrays_alias_one_huge_page_mapping_with_the_same_values():
    rng = np.random.default_rng(0)
    big = jnp.asarray(rng.normal(size=(1536, 1024)).astype(np.float32))  # 6 MiB: whole 2 MiB pages
    small = jnp.asarray(rng.normal(size=(7, 3)).astype(np.float32))
    codes = jnp.asarray(rng.integers(-127, 128, size=(33,)).astype(np.int8))
    half = jnp.asarray(rng.normal(size=(65, 9)).astype(np.float32)).astype(jnp.bfloat16)  # TPU/GPU's dtype
    kept = jnp.arange(5, dtype=jnp.int32)
    tree = {"big": big, "small": small, "codes": codes, "half": half, "kept": kept, "again": big}
    expect = {k: np.asarray(v) for k, v in tree.items()}
    out = host_memory.to_huge_pages(tree, keep={"kept": kept})

    for name, value in expect.items():
        got = out[name]
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(np.asarray(got), value)
        pointer = got.unsafe_buffer_pointer()
        assert host_memory.in_arena(pointer) and pointer % 64 == 0
    assert out["again"] is out["big"]  # one array at two places stays one
    # the sources not kept are freed as they are copied; the kept one is untouched
    assert all(x.is_deleted() for x in (big, small, codes, half)) and not kept.is_deleted()
    assert _anon_huge_kib(out["big"].unsafe_buffer_pointer()) >= 2048
    # already there: nothing is copied again
    assert host_memory.to_huge_pages(out) is out
    # products on the aliased arrays are the products on the values
    np.testing.assert_allclose(
        np.asarray(out["small"].T @ out["small"]), expect["small"].T @ expect["small"], rtol=1e-6
    )


@needs_thp
def test_mapping_is_forgotten_once_its_arrays_are_gone():
    out = host_memory.to_huge_pages({"a": jnp.ones((4, 4))})
    pointer = out["a"].unsafe_buffer_pointer()
    assert host_memory.in_arena(pointer)
    del out
    gc.collect()
    assert not host_memory.in_arena(pointer)


@pytest.mark.parametrize("linear", ["xla", "kernel"])
def test_engine_on_huge_page_weights_decodes_the_same_tokens(linear):
    cfg = tiny_config()
    params = init_params(cfg, jnp.float32, seed=3)
    tokens = {}
    for huge in (False, True):
        config = EngineConfig(
            num_slots=2, max_seq_len=64, max_prefill_len=32, decode_steps=4, linear=linear, huge_pages=huge
        )
        engine = Engine(cfg, params, config)
        in_arena = [host_memory.in_arena(x.unsafe_buffer_pointer()) for x in jax.tree.leaves(engine.params)]
        assert all(in_arena) == (huge and host_memory.huge_pages_available()) and (all(in_arena) or not any(in_arena))
        engine.insert(engine.prefill([5, 9, 17, 3], SamplingParams(max_tokens=12, ignore_eos=True), seed=0), 0)
        out = [engine.generate() for _ in range(3)]
        tokens[huge] = np.concatenate([o.tokens[o.valid[:, 0], 0] for o in out]).tolist()
    # the caller's weights are never deleted by the copy
    assert not any(x.is_deleted() for x in jax.tree.leaves(params))
    assert tokens[True] == tokens[False]
