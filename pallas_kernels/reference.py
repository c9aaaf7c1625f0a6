"""Pure-jnp references: decode a runtime-layout linear, and the (grouped) matmuls on top of it.

This is the executable spec the Pallas kernels are tested against and the ``implementation="xla"``
path of every op. The runtime layouts are documented in ``jaxwint2/layout.py``; this module only
knows the leaf names of one ``<linear>`` dict and the format string.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from .wint2 import decode_wint2

Fmt = Literal["bf16", "wint8", "wint4", "wint2"]
Activation = Literal["swiglu"] | None


def _round_to_bf16(v: jax.Array, dtype) -> jax.Array:
    """One bf16 rounding of fp32 ``v``, returned in ``dtype``.

    ``v.astype(bf16).astype(f32)`` is not enough under ``jit``: XLA's default
    ``xla_allow_excess_precision`` may drop the convert pair and keep the unrounded product
    (seen on CPU, ~1e-3 relative logit error). ``reduce_precision`` is never removed.
    """
    if jnp.dtype(dtype) == jnp.bfloat16:
        return v.astype(jnp.bfloat16)
    return jax.lax.reduce_precision(v, exponent_bits=8, mantissa_bits=7).astype(dtype)


def dequantize(w: dict[str, jax.Array], fmt: Fmt, *, k_order: str = "natural",
               dtype=jnp.bfloat16) -> jax.Array:
    """Runtime-layout ``<linear>`` leaves -> dense ``[..., K, N]`` in ``dtype``.

    The decoded values are those of the checkpoint's bf16 reference decode (one bf16 rounding);
    ``dtype=float32`` only widens them.
    """
    if fmt == "bf16":
        return w["weight"].astype(dtype)
    if fmt == "wint8":
        q = w["quant_weight"].astype(jnp.float32)
        s = w["weight_scale"].astype(jnp.float32)[..., None, :]
        return _round_to_bf16(q * s, dtype)
    if fmt == "wint4":
        b = w["quant_weight"].astype(jnp.int32)  # [..., K/2, N]
        q = jnp.stack([(b & 0xF) - 8, (b >> 4) - 8], axis=-2)  # [..., K/2, 2, N]
        q = q.reshape(*b.shape[:-2], 2 * b.shape[-2], b.shape[-1]).astype(jnp.float32)
        s = w["weight_scale"].astype(jnp.float32)[..., None, :]
        return _round_to_bf16(q * s, dtype)
    if fmt == "wint2":
        exact = decode_wint2(w["quant_weight"], w["weight_scale"], w["super_scales"],
                             w["code_scale"], w["code_zp"], k_order=k_order,
                             dtype=jnp.float32)  # q * nib * super is exact in fp32
        return _round_to_bf16(exact, dtype)
    raise ValueError(f"unknown weight format {fmt!r}")


def _precision(x):
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` (fp32 in the epilogues)."""
    return jax.nn.silu(gate) * up


def apply_epilogue(y: jax.Array, activation: Activation, row_scale: jax.Array | None):
    """fp32 epilogue (the kernels' spec too): SwiGLU on ``[gate | up]``, then the row scale."""
    if activation == "swiglu":
        n = y.shape[-1] // 2
        y = swiglu(y[..., :n], y[..., n:])
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    if row_scale is not None:
        y = y * row_scale.astype(jnp.float32)[:, None]
    return y


def quant_matmul_reference(x: jax.Array, w: dict[str, jax.Array], *, fmt: Fmt,
                           k_order: str = "natural", activation: Activation = None,
                           row_scale: jax.Array | None = None, out_dtype=None) -> jax.Array:
    """``x [M, K] @ dequantize(w) [K, N]`` with fp32 accumulation -> ``[M, N]`` (or ``N/2``)."""
    wd = dequantize(w, fmt, k_order=k_order, dtype=x.dtype)
    y = jnp.dot(x, wd, preferred_element_type=jnp.float32, precision=_precision(x))
    return apply_epilogue(y, activation, row_scale).astype(out_dtype or x.dtype)


def quant_grouped_matmul_reference(x: jax.Array, w: dict[str, jax.Array],
                                   group_sizes: jax.Array, *, fmt: Fmt, k_order: str = "natural",
                                   activation: Activation = None,
                                   row_scale: jax.Array | None = None,
                                   out_dtype=None) -> jax.Array:
    """Rows of ``x [M, K]`` sorted by group; rows of group e use expert e's weights.

    ``group_sizes`` int32 ``[E]`` may sum to less than M: trailing rows are padding and come
    out as zeros.
    """
    wd = dequantize(w, fmt, k_order=k_order, dtype=x.dtype)  # [E, K, N]
    y = jax.lax.ragged_dot(x, wd, group_sizes.astype(jnp.int32),
                           preferred_element_type=jnp.float32, precision=_precision(x))
    return apply_epilogue(y, activation, row_scale).astype(out_dtype or x.dtype)
