"""Sharding over a forced 8-device CPU mesh: same tokens and logits as one device, the table's shardings, no weight
all-gathers in decode.

XLA fixes the CPU device count when jax starts, so the multi-device work runs in a child process
(`tests/sharding_child.py`, one per model, every mesh in it) and this module, which sees the suite's single device,
asserts on what it reports. The unit tests of the mesh and rule helpers run here directly.

Collectives of one compiled decode step (`Engine._compile("generate", w)`, read from the HLO by the child):
- tensor axis (weights split over heads / MLP / vocab): one all-reduce of the residual [B, 1, D] after the embedding
  lookup (each device looks up its vocab rows, zeros elsewhere), and two per layer: after `wo` and after `w_down`;
  then small all-reduces of [B] (max and sum over the vocab-split logits for the softmax / logprobs) and all-gathers
  of the logits [B, V] and top-k values for sampling; an all-to-all of the new K/V as it is written into the pages.
- data axis (slots split): all-gathers of each layer's new K/V [B, K, H] and their page indices for the write into the
  shared pool (whole on every device of the axis), an all-reduce of the "any slot wants logprobs" predicate, and
  all-gathers of the step's outputs ([steps, B, ...]) replicated for the host.
- never an all-gather of a weight: every weight stays in its shard for the whole step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

from sharding.mesh import auto_mesh_shape, format_mesh, make_mesh, parse_mesh_spec
from sharding.rules import DEFAULT_RULES, ArrayLayout, logical_to_spec, resolve_rules, single_device_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MESHES = ["data:1,tensor:8", "data:2,tensor:4", "data:4,tensor:2", "data:8,tensor:1", "data:2,tensor:3"]
SMOL_MESHES = ["data:1,tensor:8", "data:1,tensor:3"]
CHILD_TIMEOUT_S = 600


def run_child(model: str, meshes: list[str], tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(model) / "result.json"
    cmd = [sys.executable, os.path.join(REPO, "tests", "sharding_child.py"), "--model", model]
    cmd += ["--meshes", ";".join(meshes), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    return {m: run_child(m, TINY_MESHES, tmp_path_factory) for m in ("tiny8", "tiny93")}


@pytest.fixture(scope="module")
def smol_results(tmp_path_factory):
    return {"smollm2": run_child("smollm2", SMOL_MESHES, tmp_path_factory)}


def mesh_sizes(spec: str) -> tuple[int, int]:
    sizes = parse_mesh_spec(spec)
    return sizes["data"], sizes["tensor"]


def expected_specs(config: dict, spec: str) -> dict[str, PartitionSpec]:
    """The table restated by hand: heads, MLP and vocab over tensor when they divide it, slots over data, the KV
    pool's pages whole on every device."""
    data, tensor = mesh_sizes(spec)

    def t(n: int) -> str | None:
        return "tensor" if tensor > 1 and n % tensor == 0 else None

    n, k, f, v = config["num_heads"], config["num_kv_heads"], config["mlp_dim"], config["vocab_size"]
    d = "data" if data > 1 else None
    if t(n) is None and t(k) is None:  # no axis splits heads: q, k and v run as one [(N + 2K) H, D] product
        qkv = {"['layer_0']['wqkv']": PartitionSpec(None, None), "['layer_1']['wqkv']": PartitionSpec(None, None)}
    else:
        qkv = {
            "['layer_0']['wq']": PartitionSpec(t(n), None, None),  # linear weights run [out, in]
            "['layer_0']['wkv']": PartitionSpec(None, t(k), None, None),  # k and v stacked on an unsharded axis
            "['layer_1']['wkv']": PartitionSpec(None, t(k), None, None),
        }
    return {
        "['embed']": PartitionSpec(t(v), None),
        "['final_norm']": PartitionSpec(None),
        **qkv,
        "['layer_1']['wo']": PartitionSpec(None, t(n), None),
        "['layer_0']['w_gate_up']": PartitionSpec(None, t(f), None),
        "['layer_1']['w_down']": PartitionSpec(None, t(f)),
        "['layer_0']['attn_norm']": PartitionSpec(None),
        # the KV pool: pages shared by every slot, kv heads over tensor; the data axis holds a whole copy
        "k": PartitionSpec(None, t(k), None, None),
        "v": PartitionSpec(None, t(k), None, None),
        "lengths": PartitionSpec(d),
    }


def as_spec(entries: list) -> PartitionSpec:
    """The child's JSON form of a PartitionSpec back into one."""
    return PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in entries))


def check_layout(path: str, spec: list, shape: list[int], shards: list[list[int]], mesh: dict[str, int]) -> None:
    """Each device's shard is the global shape divided by the mesh axes its spec names."""
    padded = [*spec, *([None] * (len(shape) - len(spec)))]
    want = [
        dim // (1 if axes is None else math.prod(mesh[a] for a in ([axes] if isinstance(axes, str) else axes)))
        for dim, axes in zip(shape, padded, strict=True)
    ]
    assert shards == [want], f"{path}: spec {spec}, shape {shape}: shards {shards}, expected {want}"


def assert_mesh_result(result: dict, spec: str, *, tol: float) -> None:
    ref, got = result["reference"], result[spec]
    config = json.loads(ref["config"])
    assert got["tokens_equal"], f"{spec}: {got['tokens']} != {ref['tokens']}"
    assert got["logprob_max_diff"] < tol
    if got["logits_max_diff"] is not None:
        assert got["logits_max_diff"] < tol

    specs = expected_specs(config, spec)
    arrays = {**got["params"], **{k.strip("[]'"): v for k, v in got["cache"].items()}}
    for name, want in specs.items():
        assert name in arrays or not name.startswith("["), f"{spec}: no {name} among the params {sorted(arrays)}"
        if name in arrays:
            assert as_spec(arrays[name][0]) == want, f"{spec}: {name} is {arrays[name][0]}, the table says {want}"
    mesh = parse_mesh_spec(spec)
    for name, (sharding, shape, shards) in arrays.items():
        check_layout(name, sharding, shape, shards, mesh)

    # per-device bytes: the KV pool splits over tensor when kv heads divide it (the data axis holds whole copies)
    _, tensor = mesh_sizes(spec)
    ways = tensor if config["num_kv_heads"] % tensor == 0 else 1
    assert got["kv_bytes_per_device"] == ref["kv_bytes_per_device"] // ways
    assert got["weight_bytes_per_device"] <= ref["weight_bytes_per_device"]

    # the decode step moves activations only: no all-gather produces a weight-sized array
    weight_sizes = set(ref["weight_sizes"])
    for op, type_ in got["collectives"]:
        if op == "all-gather":
            shape = [int(x) for x in type_.split("[", 1)[1].split("]", 1)[0].split(",") if x]
            assert math.prod(shape) not in weight_sizes, f"{spec}: decode all-gathers a weight-sized {type_}"

    def dims(type_: str) -> list[int]:
        return [int(x) for x in type_.split("[", 1)[1].split("]", 1)[0].split(",") if x]

    # the residual stream: [slots, D] after the embedding lookup, feature-major [D, slots] after wo and w_down
    residual = [
        t for op, t in got["collectives"] if op == "all-reduce" and len(dims(t)) == 2 and config["dim"] in dims(t)
    ]
    sharded_layers = tensor > 1 and config["num_heads"] % tensor == 0
    if sharded_layers:
        # embedding lookup + (after wo, after w_down) per layer
        assert len(residual) == 1 + 2 * config["num_layers"], got["collectives"]
    elif tensor == 1:
        assert not residual


@pytest.mark.parametrize("spec", TINY_MESHES)
@pytest.mark.parametrize("model", ["tiny8", "tiny93"])
def test_tiny_mesh_matches_single_device(tiny_results, model, spec):
    assert_mesh_result(tiny_results[model], spec, tol=1e-4)


def test_tiny_kv_bytes_shrink_as_the_tensor_axis_grows(tiny_results):
    result = tiny_results["tiny8"]
    by_tensor = {1: result["reference"]["kv_bytes_per_device"]}
    for spec in TINY_MESHES:
        _, tensor = mesh_sizes(spec)
        if 8 % tensor == 0:  # tiny8's 8 kv heads split; on tensor 3 the pool is replicated (asserted above)
            by_tensor.setdefault(tensor, result[spec]["kv_bytes_per_device"])
    sizes = [by_tensor[n] for n in sorted(by_tensor)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), by_tensor


def test_tiny93_warns_what_replication_costs(tiny_results):
    notes = tiny_results["tiny93"]["data:1,tensor:8"]["notes"]
    assert any(n.startswith("q_heads=9 does not divide tensor=8: replicating wq/wo over tensor, +") for n in notes)
    assert any(n.startswith("kv_heads=3 does not divide tensor=8: replicating wk/wv/kv_pool") for n in notes)
    assert not tiny_results["tiny93"]["data:2,tensor:3"]["notes"]  # 9 and 3 heads, 96 and 384 all divide 3


@pytest.mark.slow
@pytest.mark.parametrize("spec", SMOL_MESHES)
def test_smollm2_mesh_matches_single_device(smol_results, spec):
    assert_mesh_result(smol_results["smollm2"], spec, tol=2e-3)


# ----- the helpers, on this process's single device ---------------------------------------------------------------


def test_parse_and_format_mesh_spec():
    assert parse_mesh_spec("data:2,tensor:4") == {"data": 2, "tensor": 4}
    assert parse_mesh_spec("tensor:3") == {"data": 1, "tensor": 3}
    assert format_mesh({"data": 2, "tensor": 4}) == "data:2,tensor:4"
    for bad in ("model:2", "data:0", "data:x", "data:2,data:2", "tensor"):
        with pytest.raises(ValueError, match="mesh spec"):
            parse_mesh_spec(bad)


def test_make_mesh_validates_the_device_count():
    assert dict(make_mesh("data:1,tensor:1").shape) == {"data": 1, "tensor": 1}
    assert dict(make_mesh("auto").shape) == {"data": 1, "tensor": 1}
    with pytest.raises(ValueError, match="needs 8 devices but the job has 1"):
        make_mesh("data:2,tensor:4")


def test_auto_mesh_is_tensor_parallel_first():
    assert auto_mesh_shape(8, 8) == {"data": 1, "tensor": 8}
    assert auto_mesh_shape(16, 4) == {"data": 4, "tensor": 4}  # tensor stays inside a host
    assert auto_mesh_shape(8, 8, kv_heads=3) == {"data": 8, "tensor": 1}
    assert auto_mesh_shape(8, 8, kv_heads=4) == {"data": 2, "tensor": 4}


def test_rules_refuse_two_dims_on_one_mesh_axis():
    mesh = make_mesh("data:1,tensor:1")
    assert logical_to_spec(("embed", "q_heads"), DEFAULT_RULES, mesh) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="both map to mesh axis"):
        logical_to_spec(("q_heads", "mlp"), DEFAULT_RULES, _FakeMesh({"data": 1, "tensor": 2}))


def test_resolve_rules_replicates_non_dividing_axes():
    mesh = _FakeMesh({"data": 2, "tensor": 4})
    arrays = [ArrayLayout("wq", ("embed", "q_heads", "head_dim"), (576, 9, 64), 4)]
    rules, notes = resolve_rules(DEFAULT_RULES, mesh, {"q_heads": 9, "kv_heads": 3, "mlp": 1536, "slots": 8}, arrays)
    assert rules["q_heads"] is None and rules["kv_heads"] is None
    assert rules["mlp"] == "tensor" and rules["slots"] == "data"
    # 576*9*64*4 bytes whole, vs 3 of 9 heads per device if it were split (rounded up): +0.84 MiB
    assert notes[0] == "q_heads=9 does not divide tensor=4: replicating wq over tensor, +0.84 MiB per device"
    assert logical_to_spec(("slots", "kv_heads"), DEFAULT_RULES, mesh, shape=(8, 3)) == PartitionSpec("data", None)


def test_single_device_mesh_is_the_default():
    assert dict(single_device_mesh().shape) == {"data": 1, "tensor": 1}


class _FakeMesh:
    """Only the `.shape` that rule resolution reads: lets the rule logic be tested without 8 devices."""

    def __init__(self, shape: dict[str, int]) -> None:
        self.shape = shape
