"""What the KV-cache kernel tests share: float pools turned into an int8 KV cache as the engine writes one."""

from __future__ import annotations

import jax.numpy as jnp

from engine.attention import Int8Pages, quantize_kv


def int8_pools(k_pool, v_pool, hide=None) -> tuple[Int8Pages, Int8Pages]:
    """Key [Np, K, H, P] and value [Np, K, P, H] pools as Int8Pages, each position's vector quantized on its own;
    `hide` [Np, P] bool: those positions' scales become NaN, which any read of them would spread."""
    k_values, k_scale = quantize_kv(jnp.swapaxes(jnp.asarray(k_pool), 2, 3))  # per position: [Np, K, P, H]
    v_values, v_scale = quantize_kv(jnp.asarray(v_pool))
    if hide is not None:
        mask = jnp.asarray(hide)[:, None, :]
        k_scale, v_scale = (jnp.where(mask, jnp.nan, s).astype(s.dtype) for s in (k_scale, v_scale))
    return Int8Pages(jnp.swapaxes(k_values, 2, 3), k_scale), Int8Pages(v_values, v_scale)
