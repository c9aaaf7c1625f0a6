"""Small building blocks of the ERNIE-4.5 decoder: linear, RMSNorm, RoPE, embedding, SwiGLU MLP.

Every block is a Flax NNX module built from its slice of the runtime parameter tree
(``jaxwint2/layout.py``); nothing here initialises weights. Leaves may carry extra leading axes
(the layers of a :class:`jaxwint2.decoder.LayerStack` are stacked on one): modules only look at
their trailing dimensions at call time.

Numerics follow ``ernie45-architecture.md``: RMSNorm in fp32, cast back to the activation dtype
*before* the weight multiply; RoPE on adjacent pairs ``(2j, 2j+1)`` in fp32; matmuls accumulate
in fp32. This module does not know about quantized bit layouts (``WeightFormat`` does) nor about
attention or routing.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .formats import WeightFormat


def _precision(dtype) -> jax.lax.Precision | None:
    """fp32 compute means fp32 matmuls (no TF32/bf16 passes); bf16 uses the default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class Linear(nnx.Module):
    """``y = x @ W`` for ``W [K, N]`` held in its checkpoint format.

    The leaves are those of one ``<linear>`` of the runtime layout (``weight``, or
    ``quant_weight`` + scales), stacked ``[E, ...]`` for experts. All math goes through the
    :class:`WeightFormat`, so a WINT2 linear and a bf16 one are called the same way.

    Example:
      >>> up_gate = Linear(params["mlp"]["up_gate"], WeightFormat("wint8"))
      >>> h = up_gate(x, activation="swiglu")                      # [..., H] -> [..., I]
      >>> y = experts_down.grouped(h_sorted, group_sizes, row_scale=w)  # stacked experts
    """

    def __init__(self, leaves: Mapping[str, jax.Array], fmt: WeightFormat):
        self.fmt = fmt
        self.leaf_names = tuple(sorted(leaves))
        for name in self.leaf_names:
            setattr(self, name, nnx.Param(jnp.asarray(leaves[name])))
        # Set (to a traced int) by LayerStack while its scan runs: the leaves then hold the
        # whole layer stack [L, ...] and the kernels read layer `layer` of it in place.
        self.layer = None

    def leaves(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.leaf_names}

    def __call__(self, x: jax.Array, *, activation=None, row_scale=None,
                 out_dtype=None) -> jax.Array:
        """``x [..., K]`` -> ``[..., N]`` (``N/2`` with ``activation="swiglu"``)."""
        lead = x.shape[:-1]
        y = self.fmt.matmul(x.reshape(-1, x.shape[-1]), self.leaves(), activation=activation,
                            row_scale=row_scale, out_dtype=out_dtype, layer=self.layer)
        return y.reshape(*lead, y.shape[-1])

    def grouped(self, x: jax.Array, group_sizes: jax.Array, *, activation=None, row_scale=None,
                out_dtype=None) -> jax.Array:
        """Stacked experts: rows of ``x [M, K]`` sorted by expert, ``group_sizes [E]``."""
        return self.fmt.grouped_matmul(x, self.leaves(), group_sizes, activation=activation,
                                       row_scale=row_scale, out_dtype=out_dtype,
                                       layer=self.layer)

    def expert_ffn(self, down: Linear, x: jax.Array, group_sizes: jax.Array, *,
                   row_scale=None, out_dtype=jnp.float32) -> jax.Array:
        """Stacked experts' ``down.grouped(self.grouped(x, activation="swiglu"), ...)``: the
        SwiGLU FFN with this layer as its up_gate, as one op where the format fuses it."""
        if down.fmt != self.fmt or down.layer is not self.layer:
            h = self.grouped(x, group_sizes, activation="swiglu")
            return down.grouped(h, group_sizes, row_scale=row_scale, out_dtype=out_dtype)
        return self.fmt.expert_ffn(x, self.leaves(), down.leaves(), group_sizes,
                                   row_scale=row_scale, out_dtype=out_dtype, layer=self.layer)

    def dequantized(self, dtype=jnp.float32) -> jax.Array:
        """The dense weight ``[..., K, N]`` this layer computes with."""
        return self.fmt.dequantize(self.leaves(), dtype)


class RMSNorm(nnx.Module):
    """``w * cast_back(x32 * rsqrt(mean(x32^2) + eps))``; ``w`` is stored in fp32."""

    def __init__(self, weight: jax.Array, eps: float):
        self.weight = nnx.Param(jnp.asarray(weight, jnp.float32))
        self.eps = float(eps)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding on adjacent pairs (GPT-J style), computed in fp32.

    Args:
      x: ``[B, T, heads, d]`` queries or keys.
      positions: int ``[B, T]`` absolute positions (padding rows may hold anything).
      theta: ``rope_theta``.

    Returns:
      ``x`` rotated, in its own dtype: ``out[2j] = x[2j] cos - x[2j+1] sin``,
      ``out[2j+1] = x[2j+1] cos + x[2j] sin`` with angle ``pos * theta^(-2j/d)``.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
    angle = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [B, T, 1, d/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], d // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # [B, T, heads, d/2]
    out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding ``[V, H]`` (bf16 in the runtime layout); also the tied output head.

    With ``axis_name`` (tensor parallelism under ``shard_map``) this rank holds vocab rows
    ``[r * V_local, (r+1) * V_local)``: ids outside them look up zeros and the ranks' rows are
    summed over the axis; :meth:`attend` then gives this rank's vocab columns only.
    """

    def __init__(self, weight: jax.Array, axis_name: str | None = None):
        self.weight = nnx.Param(jnp.asarray(weight))
        self.axis_name = axis_name

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        if self.axis_name is None:
            return jnp.take(self.weight[...], ids, axis=0).astype(dtype)
        rows = self.weight.shape[0]
        local = ids - jax.lax.axis_index(self.axis_name) * rows
        mine = (local >= 0) & (local < rows)
        x = jnp.take(self.weight[...], jnp.where(mine, local, 0), axis=0)
        x = jnp.where(mine[..., None], x, jnp.zeros_like(x))  # exactly one rank is non-zero
        return jax.lax.psum(x, self.axis_name).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied head: ``x [..., H] @ weight.T`` -> fp32 ``[..., V]``."""
        w = self.weight[...].astype(x.dtype)
        return jnp.einsum("...h,vh->...v", x, w, preferred_element_type=jnp.float32,
                          precision=_precision(x.dtype))


class LMHead(nnx.Module):
    """Untied output head ``[H, V]``: ``x @ W`` -> fp32 logits."""

    def __init__(self, weight: jax.Array):
        self.weight = nnx.Param(jnp.asarray(weight))

    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.weight[...].astype(x.dtype)
        return jnp.einsum("...h,hv->...v", x, w, preferred_element_type=jnp.float32,
                          precision=_precision(x.dtype))


class SwiGLU(nnx.Module):
    """Dense FFN ``down(silu(gate(x)) * up(x))`` over a fused ``up_gate`` = ``[gate | up]``.

    The SwiGLU is the ``up_gate`` matmul's epilogue, so a fused kernel never writes ``[M, 2I]``.
    Used for the dense layers and for the shared experts of MoE layers.
    """

    def __init__(self, params: Mapping[str, Mapping[str, jax.Array]], fmt: WeightFormat):
        self.up_gate = Linear(params["up_gate"], fmt)
        self.down = Linear(params["down"], fmt)

    def __call__(self, x: jax.Array, *, out_dtype=None) -> jax.Array:
        return self.down(self.up_gate(x, activation="swiglu"), out_dtype=out_dtype)
