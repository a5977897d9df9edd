"""The 8-device half of tests/test_sharding.py, run in its own process (XLA reads the device count once, at start).

    python tests/sharding_child.py --model tiny8 --meshes data:1,tensor:8 --out result.json

Builds a single-device reference engine and one engine per mesh, runs the same greedy requests through each, and
writes what the parent test asserts on: tokens, logits and logprob differences against the reference, each
array's PartitionSpec and per-device shard shapes, per-device weight / KV bytes, and the collectives of the
compiled decode step.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # the XLA flag above is set before jax (imported below) starts
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from engine.config import tiny_config
from engine.engine import Engine, EngineConfig
from engine.load import load_engine
from engine.model import init_params
from engine.sampling import SamplingParams
from engine.scheduler import Request, Scheduler
from engine.tokenizer import make_tiny_tokenizer
from sharding.mesh import make_mesh
from sharding.rules import single_device_mesh

MODELS = {
    # every head count, the MLP and the vocab divide 1, 2, 4 and 8 (not 3: the 3-way mesh replicates them all)
    "tiny8": dict(num_heads=16, num_kv_heads=8, head_dim=8, dim=64, mlp_dim=128, vocab_size=256),
    # SmolLM2's 9 query / 3 kv heads: replicated on tensor 2/4/8, split on tensor 3; MLP and vocab divide 2..8 and 3
    "tiny93": dict(num_heads=9, num_kv_heads=3, head_dim=8, dim=48, mlp_dim=96, vocab_size=384),
}
PROMPTS = [[5, 17, 99, 3, 42], [7] * 11, [200, 3, 9, 1, 60, 61, 62, 63, 2, 8, 8, 8, 31, 30]]
COLLECTIVE = re.compile(r"=\s*(\S+|\(.*?\))\s+(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)")


def run_requests(engine: Engine, tokenizer, max_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their logprobs for PROMPTS, through the scheduler (prefill, insert, generate, sampling)."""
    outs: dict[str, list] = {}
    scheduler = Scheduler(engine, tokenizer)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    for i, prompt in enumerate(PROMPTS):
        scheduler.submit(Request(str(i), prompt, params, lambda o: outs.setdefault(o.request_id, []).append(o)))
    scheduler.run_until_idle(max_steps=1000)
    tokens = [[t for o in outs[str(i)] for t in o.token_ids] for i in range(len(PROMPTS))]
    logprobs = [[lp.logprob for o in outs[str(i)] for lp in o.logprobs] for i in range(len(PROMPTS))]
    return tokens, logprobs


def forward_logits(engine: Engine) -> np.ndarray:
    """Full-sequence logits [2, 16, V] of a fixed batch, with the engine's (sharded) weights."""
    tokens = (np.arange(32, dtype=np.int32).reshape(2, 16) * 7) % engine.model_config.vocab_size
    positions = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    logits, _ = jax.jit(lambda p, t, q: engine.model.apply({"params": p}, t, q))(engine.params, tokens, positions)
    return np.asarray(logits)


def layout(tree) -> dict[str, list]:
    """path -> [PartitionSpec entries, global shape, sorted distinct per-device shard shapes]."""
    out = {}
    for path, a in jax.tree_util.tree_leaves_with_path(tree):
        shards = sorted({tuple(s.data.shape) for s in a.addressable_shards})
        spec = [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]
        out[jax.tree_util.keystr(path)] = [spec, list(a.shape), [list(s) for s in shards]]
    return out


def collectives(hlo: str) -> list[list[str]]:
    """[op, result type] for every collective in compiled HLO text."""
    return [[m.group(2), m.group(1)] for m in COLLECTIVE.finditer(hlo)]


def build(model: str, mesh, config: EngineConfig) -> tuple[Engine, object]:
    if model == "smollm2":
        return load_engine(None, config, mesh=mesh)
    cfg = tiny_config(**MODELS[model])
    return Engine(cfg, init_params(cfg, jnp.float32), config, mesh=mesh), make_tiny_tokenizer(cfg.vocab_size)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, choices=[*MODELS, "smollm2"])
    parser.add_argument("--meshes", required=True, help="';'-separated mesh specs, e.g. 'data:1,tensor:8'")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    small = args.model != "smollm2"
    config = EngineConfig(
        num_slots=8,
        max_seq_len=64,
        max_prefill_len=16 if small else 32,
        min_prefill_len=16 if small else 32,
        page_size=32 if small else 64,
        decode_steps=4,
        dtype="float32",
    )
    max_tokens = 12 if small else 8
    start = time.perf_counter()
    ref, tokenizer = build(args.model, single_device_mesh(), config)
    ref_tokens, ref_logprobs = run_requests(ref, tokenizer, max_tokens)
    ref_logits = forward_logits(ref) if small else None
    report = ref.describe_sharding()
    result = {
        "reference": {
            "tokens": ref_tokens,
            "weight_bytes_per_device": report.weight_bytes_per_device,
            "kv_bytes_per_device": report.kv_bytes_per_device,
            "weight_sizes": [int(np.prod(a.shape)) for a in jax.tree.leaves(ref.params) if a.ndim >= 2],
            "config": ref.model_config.to_json(),
        }
    }
    del ref
    for spec in args.meshes.split(";"):
        sizes = dict(part.split(":") for part in spec.split(","))
        n = int(sizes["data"]) * int(sizes["tensor"])
        mesh = make_mesh(spec, jax.devices()[:n])
        engine, tokenizer = build(args.model, mesh, config)
        tokens, logprobs = run_requests(engine, tokenizer, max_tokens)
        logprob_diff = max(
            np.max(np.abs(np.array(a) - np.array(b))) for a, b in zip(logprobs, ref_logprobs, strict=True)
        )
        logits_diff = None if ref_logits is None else np.max(np.abs(forward_logits(engine) - ref_logits))
        report = engine.describe_sharding()
        state = engine.state
        hlo = engine._compile("generate", 1).as_text()
        result[spec] = {
            "tokens": tokens,
            "tokens_equal": tokens == ref_tokens,
            "logprob_max_diff": float(logprob_diff),
            "logits_max_diff": None if logits_diff is None else float(logits_diff),
            "params": layout(engine.params),
            "cache": layout({"k": state.k[0], "v": state.v[0], "lengths": state.lengths}),
            "weight_bytes_per_device": report.weight_bytes_per_device,
            "kv_bytes_per_device": report.kv_bytes_per_device,
            "rules": {k: v if not isinstance(v, tuple) else list(v) for k, v in report.rules.items()},
            "notes": list(report.notes),
            "collectives": collectives(hlo),
            "describe": report.describe(),
        }
        del engine, state
    result["seconds"] = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
