"""The mesh half of tests/test_int8.py, in its own process (XLA reads the device count once, at start):

    python tests/int8_child.py result.json

An int8 engine on one device and on forced 8-device meshes, the same greedy requests through each; writes per mesh
whether the tokens are equal, the largest logit difference, and the PartitionSpecs of two layers' scales. Then the
same for an int8 KV cache (float32 and bfloat16 engines, float weights): tokens, logprobs, and the PartitionSpecs of
a layer's pool values and scales."""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import dataclasses  # the XLA flag above is set before jax (imported below) starts
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.model import init_params
from engine.sampling import SamplingParams
from sharding.mesh import make_mesh

PROMPTS = [[5, 17, 99, 3, 42, 8], list(range(20, 57))]


def greedy(engine: Engine, ids: list[int], logprobs: list[float] | None = None) -> list[int]:
    prefix = engine.prefill(ids, SamplingParams(max_tokens=10, ignore_eos=True, logprobs=1), 0)
    engine.insert(prefix, 0)
    got = [prefix.token]
    while engine.slot_active(0):
        out = engine.generate()
        got += out.tokens[out.valid[:, 0], 0].tolist()
        if logprobs is not None:
            logprobs += out.logprob[out.valid[:, 0], 0].tolist()
    engine.release(0)
    return got


def kv_int8(cfg, params, config) -> dict:
    """Per dtype and mesh: the int8 KV engine's greedy tokens and decode logprobs against one device's."""
    results = {}
    for dtype in ("float32", "bfloat16"):
        p = jax.tree.map(lambda a, dt=dtype: a.astype(dt), params)
        c = dataclasses.replace(config, quantize="none", kv_dtype="int8", dtype=dtype)
        one = Engine(cfg, p, c, mesh=make_mesh("data:1,tensor:1", devices=jax.devices()[:1]))
        expected, expected_lp = [], []
        for ids in PROMPTS:
            lp: list[float] = []
            expected.append(greedy(one, ids, lp))
            expected_lp.append(lp)
        for spec in ("data:1,tensor:8", "data:2,tensor:4"):
            engine = Engine(cfg, p, c, mesh=make_mesh(spec))
            tokens, diffs = [], []
            for ids, want in zip(PROMPTS, expected_lp, strict=True):
                lp = []
                tokens.append(greedy(engine, ids, lp))
                diffs.append(float(np.abs(np.asarray(lp) - np.asarray(want)).max()))
            k = engine.state.k[0]
            results[f"{dtype} {spec}"] = {
                "tokens_equal": tokens == expected,
                "max_logprob_diff": max(diffs),
                "values": list(k.values.sharding.spec),
                "scale": list(k.scale.sharding.spec),
                "attention": engine.attention,
            }
    return results


def logits(engine: Engine, ids: list[int]) -> np.ndarray:
    positions = jnp.arange(len(ids), dtype=jnp.int32)[None]
    out = jax.jit(lambda p, t: engine.model.apply({"params": p}, t, positions)[0][0])
    return np.asarray(out(engine.params, jnp.asarray([ids], jnp.int32)))


def main(path: str) -> None:
    # heads, MLP and vocab divide 2, 4 and 8
    cfg = tiny_config(num_heads=16, num_kv_heads=8, head_dim=8, dim=64, mlp_dim=128, vocab_size=256)
    params = init_params(cfg, jnp.float32, seed=7)
    config = EngineConfig(
        num_slots=4,
        max_seq_len=128,
        max_prefill_len=64,
        page_size=16,
        decode_steps=4,
        dtype="float32",
        quantize="int8",
        linear="xla",
    )
    one = Engine(cfg, params, config, mesh=make_mesh("data:1,tensor:1", devices=jax.devices()[:1]))
    expected = [greedy(one, ids) for ids in PROMPTS]
    ref_logits = [logits(one, ids) for ids in PROMPTS]
    results = {}
    for spec in ("data:1,tensor:8", "data:2,tensor:4", "data:4,tensor:2"):
        engine = Engine(cfg, params, config, mesh=make_mesh(spec))
        layer = engine.params["layer_0"]
        results[spec] = {
            "tokens_equal": [greedy(engine, ids) for ids in PROMPTS] == expected,
            "max_logit_diff": max(
                float(np.abs(logits(engine, ids) - r).max()) for ids, r in zip(PROMPTS, ref_logits, strict=True)
            ),
            "w_gate_up_scale": list(layer["w_gate_up_scale"].sharding.spec),
            "w_down_scale": list(layer["w_down_scale"].sharding.spec),
        }
    results["kv_int8"] = kv_int8(cfg, params, config)
    with open(path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(sys.argv[1])
