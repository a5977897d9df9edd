"""Ahead-of-time compilation: the table of shapes the engine runs, each step lowered with abstract arguments in their
shardings and compiled once, and a parallel warm-up that compiles them all before the first request.

A shape is (kind, size): a prefill bucket, a decode window, the insert of a bucket's row count, the host tier's
fixed copy size. `StepCompiler.shapes` lists exactly what the engine dispatches, so after `warmup()` nothing
compiles, whatever requests come and go.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from engine import steps
from engine.api import EngineConfig
from engine.attention import PrefillPaging, context_block_pages
from engine.model import Transformer
from engine.placement import named, state_shardings
from engine.prefill import prefill_rows
from engine.sampling import SlotSampling
from engine.steps import DecodeState, DevicePrefix
from sharding.rules import MeshAxes

log = logging.getLogger(__name__)

HOST_COPY_PAGES = 32
"""Pages one copy between the device pool and the host tier moves (a fixed shape: one compiled gather and one
scatter; fewer pages are padded with the sink)."""


CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
"""XLA options for the engine's steps on CPU: YNNPACK keeps the dots it takes (XLA's products, --linear=xla), while
reductions and elementwise fusions stay XLA's own loops. By default this XLA hands the greedy argmax's reductions
over the vocabulary to YNNPACK, which does them slower: over [49152, 64] logits 2.77 ms against 1.81 in XLA's loop,
and decode at 64 slots (SmolLM2-135M, float32, kernels) ran 6.8% and 9.0% faster without (medians of alternating
passes in one process; 2-core Zen 3 VM, jax 0.10.2). At one slot the two measured level."""


@functools.cache
def _cpu_options_known(platform: str) -> bool:
    """Whether this jaxlib's XLA knows CPU_COMPILER_OPTIONS (experimental options come and go between versions):
    compiles a trivial function with them once."""
    try:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices(backend=platform)[0])
        x = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=one)
        jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=CPU_COMPILER_OPTIONS)
    except Exception as exc:  # XlaRuntimeError (INVALID_ARGUMENT) naming the option
        if not any(name in str(exc) for name in CPU_COMPILER_OPTIONS):
            raise
        log.warning("this XLA does not take %s; the engine's steps compile with its defaults", CPU_COMPILER_OPTIONS)
        return False
    return True


def compiler_options(mesh: Mesh) -> dict[str, str]:
    """The XLA options the engine's steps compile with on `mesh`'s platform (CPU_COMPILER_OPTIONS on CPU)."""
    platform = mesh.devices.flat[0].platform
    return dict(CPU_COMPILER_OPTIONS) if platform == "cpu" and _cpu_options_known(platform) else {}


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)


class StepCompiler:
    """The engine's compiled executables, one per (kind, size), each compiled on first use or by `warmup()`."""

    def __init__(
        self,
        model: Transformer,
        config: EngineConfig,
        dtype: jnp.dtype,
        mesh: Mesh,
        rules: dict[str, MeshAxes],
        kv_pages: int,
        params: Any,
        *,
        host_tier: bool,
    ) -> None:
        """`params`: the engine's weights (only their shapes and shardings are read); `host_tier`: whether the
        host KV tier's spill and restore copies run."""
        self.model, self.config, self.dtype, self.mesh, self.rules = model, config, dtype, mesh, rules
        self.host_tier = host_tier
        self.state_shardings = state_shardings(model.config.num_layers, mesh, rules, config.kv_dtype)
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.init_state = functools.partial(steps.init_state, model.config, config, kv_pages, dtype)
        self.state_abstract: DecodeState = _abstract(jax.eval_shape(self.init_state), self.state_shardings)
        self.params_abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), params
        )
        self.compiled: dict[tuple[str, int], Any] = {}
        self.compiler_options = compiler_options(mesh)

    @property
    def shapes(self) -> list[tuple[str, int]]:
        """Every (step, size) the engine runs: warm-up compiles exactly these."""
        e = self.config
        rows = sorted({prefill_rows(e, t) for t in e.prefill_buckets})
        inserts = {r: t for t in reversed(e.prefill_buckets) for r in [prefill_rows(e, t)]}
        return (
            [("prefill", t) for t in e.prefill_buckets]
            + [("generate", w) for w in e.windows]
            + [("insert", inserts[r]) for r in rows]
            + [("release", 0), ("init", 0)]
            + ([("spill", HOST_COPY_PAGES), ("restore", HOST_COPY_PAGES)] if self.host_tier else [])
        )

    def get(self, kind: str, size: int):
        """The compiled executable for one shape (compiled now if warm-up did not)."""
        key = (kind, size)
        if key not in self.compiled:
            self.compiled[key] = self._build(kind, size)
        return self.compiled[key]

    def warmup(self, max_workers: int | None = None) -> float:
        """Compiles every shape not compiled yet; returns seconds taken. Shapes compile in parallel threads (XLA
        compiles outside the GIL), one per core by default."""
        start = time.perf_counter()
        todo = [s for s in self.shapes if s not in self.compiled]
        with concurrent.futures.ThreadPoolExecutor(max_workers or os.cpu_count() or 1) as pool:
            compiled = list(pool.map(lambda shape: self._build(*shape), todo))
        self.compiled.update(zip(todo, compiled, strict=True))
        elapsed = time.perf_counter() - start
        log.info("warm-up compiled %d shapes in %.1f s", len(todo), elapsed)
        return elapsed

    def _build(self, kind: str, size: int):
        """One shape lowered and compiled with the platform's options (`compiler_options`)."""
        return self.lower(kind, size).compile(compiler_options=self.compiler_options)

    def _rows_abstract(self, r: int) -> tuple:
        rep = self.replicated
        sampling_abs = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), SlotSampling.empty(r)
        )
        per_row = jax.ShapeDtypeStruct((r,), jnp.int32, sharding=rep)
        return per_row, jax.ShapeDtypeStruct((r,), bool, sharding=rep), sampling_abs

    def lower(self, kind: str, size: int):
        """One step jitted with its shardings (the state donated where the step returns it) and lowered with
        abstract arguments."""
        rep, e, c = self.replicated, self.config, self.model.config
        i32 = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
        state_abs, params_abs = self.state_abstract, self.params_abstract
        if kind == "prefill":
            r = prefill_rows(e, size)
            per_row, want_abs, sampling_abs = self._rows_abstract(r)
            prefix_sh = DevicePrefix(rep, rep, rep, rep, jax.tree.map(lambda _: rep, SlotSampling.empty(1)))
            fn = jax.jit(
                functools.partial(steps.prefill, self.model),
                donate_argnums=(1,),
                out_shardings=(self.state_shardings, prefix_sh, rep),
            )
            row_abs = jax.ShapeDtypeStruct((1, size), jnp.int32, sharding=rep)
            per_token = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=rep)
            per_ctx = jax.ShapeDtypeStruct((e.context_pages,), jnp.int32, sharding=rep)
            paging = PrefillPaging(per_token, per_token, per_ctx, per_ctx, per_ctx, i32,
                                   block_pages=context_block_pages(e.page_size), ctx_start=per_ctx)  # fmt: skip
            args = (params_abs, state_abs, row_abs, row_abs, row_abs, paging, per_row, per_row, per_row, per_row,
                    per_row, want_abs, sampling_abs)  # fmt: skip
        elif kind == "insert":
            fn = jax.jit(steps.insert, donate_argnums=(1,), out_shardings=self.state_shardings)
            per_row, want_abs, sampling_abs = self._rows_abstract(prefill_rows(e, size))
            args = (DevicePrefix(per_row, per_row, per_row, want_abs, sampling_abs), state_abs, i32, i32, i32)
        elif kind == "init":
            fn = jax.jit(self.init_state, out_shardings=self.state_shardings)
            args = ()
        elif kind == "release":
            fn = jax.jit(steps.release, donate_argnums=(0,), out_shardings=self.state_shardings)
            args = (state_abs, i32)
        elif kind in ("spill", "restore"):
            pages = jax.ShapeDtypeStruct((size,), jnp.int32, sharding=rep)
            # one array [L, W, ...] per leaf of a layer's pools (see steps.spill), split as that leaf is
            layer = jax.tree.leaves((state_abs.k[0], state_abs.v[0]))
            arrays_abs = tuple(
                jax.ShapeDtypeStruct(
                    (c.num_layers, size, *a.shape[1:]),
                    a.dtype,
                    sharding=NamedSharding(self.mesh, PartitionSpec(None, *a.sharding.spec)),
                )
                for a in layer
            )
            if kind == "spill":
                fn = jax.jit(steps.spill, out_shardings=tuple(a.sharding for a in arrays_abs))
                args = (state_abs, pages)
            else:
                fn = jax.jit(steps.restore, donate_argnums=(0,), out_shardings=self.state_shardings)
                args = (state_abs, pages, *arrays_abs)
        elif kind == "generate":
            fn = jax.jit(
                functools.partial(steps.generate, self.model, e, window=size),
                donate_argnums=(1,),
                out_shardings=(self.state_shardings, rep),
            )
            table_sh = named(("slots", None), self.mesh, self.rules)
            table = jax.ShapeDtypeStruct((e.num_slots, size), jnp.int32, sharding=table_sh)
            args = (params_abs, state_abs, table, i32)
        else:
            raise KeyError(kind)
        return fn.lower(*args)
