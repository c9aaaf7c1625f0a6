"""Decoder layers, and runs of identically-shaped layers executed by one ``lax.scan``.

A :class:`DecoderLayer` is ``h = x + attn(norm(x)); out = h + ffn(norm(h))`` where ``ffn`` is a
dense SwiGLU or a :class:`~jaxwint2.moe.MoE`. Compile time is linear in the number of distinct
layer *shapes*, not layers: :func:`layer_groups` splits the stack into runs whose parameter trees
have identical shapes (ERNIE-4.5-300B: dense 0-2, WINT4 MoE 3-6, WINT2 MoE 7-53), and a
:class:`LayerStack` holds one run with every leaf stacked on a leading axis and runs it with
``jax.lax.scan``: 3 layer bodies to compile instead of 54.

The KV cache rides in the scan carry and each layer writes its slice in place (``.at[layer]``),
so donation keeps the cache buffers un-copied. The weights of every :class:`Linear` are *not*
scanned over: the scan body sees the whole stack plus the layer index and the kernels read that
layer in place (a scanned-over weight is a dynamic slice, which XLA materialises as a copy before
each kernel that takes it: measured on an H100, 15 of 22 ms of a 12-layer 300B decode step).
Only the small leaves (norms, router) are sliced per layer. This module knows the runtime tree of
one layer (``jaxwint2/layout.py``) but not files, tokens or logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import kv_cache as kvc
from . import layout
from .attention import Attention
from .config import ErnieConfig
from .formats import WeightFormat
from .layers import Linear, RMSNorm, SwiGLU
from .moe import MoE


class DecoderLayer(nnx.Module):
    """One pre-norm decoder layer (dense or MoE FFN) built from its runtime-tree slice."""

    def __init__(self, cfg: ErnieConfig, params: Mapping[str, Any], *, moe: bool,
                 dense_fmt: WeightFormat, expert_fmt: WeightFormat | None,
                 axis_name: str | None = None):
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(params["input_norm"]["weight"], eps)
        self.attn = Attention(cfg, params["attn"], dense_fmt, axis_name=axis_name)
        self.post_attention_norm = RMSNorm(params["post_attention_norm"]["weight"], eps)
        if moe:
            self.mlp = MoE(params["mlp"], k=cfg.moe_k, expert_fmt=expert_fmt,
                           dense_fmt=dense_fmt, axis_name=axis_name)
        else:
            self.mlp = SwiGLU(params["mlp"], dense_fmt)
        self.dense_tp_sum = axis_name if not moe else None

    def __call__(self, x: jax.Array, positions: jax.Array, kv=None):
        """``x [B, T, H]`` -> ``(x', cache')``; ``kv`` = ``(cache, layer_index, batch)``."""
        # Named scopes label the compiled ops by phase (``jaxwint2.profile`` groups by them).
        with jax.named_scope("attention"):
            y, cache = self.attn(self.input_norm(x), positions, kv)
        h = x + y
        with jax.named_scope("moe" if isinstance(self.mlp, MoE) else "dense_mlp"):
            if self.dense_tp_sum is None:
                f = self.mlp(self.post_attention_norm(h))
            else:  # row-parallel down: fp32 partial sums reduced, rounded once (as attention)
                f = self.mlp(self.post_attention_norm(h), out_dtype=jnp.float32)
                f = jax.lax.psum(f, self.dense_tp_sum).astype(h.dtype)
        return h + f, cache


def _layer_signature(cfg: ErnieConfig, i: int):
    shapes = layout.layer_shapes(cfg, i)
    return jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes))


def layer_groups(cfg: ErnieConfig) -> list[range]:
    """Maximal runs of consecutive layers with identical parameter shapes and dtypes.

    >>> layer_groups(ErnieConfig.ernie45_300b_a47b())
    [range(0, 3), range(3, 7), range(7, 54)]
    """
    groups: list[range] = []
    start = 0
    for i in range(1, cfg.num_hidden_layers + 1):
        if i == cfg.num_hidden_layers or _layer_signature(cfg, i) != _layer_signature(cfg, start):
            groups.append(range(start, i))
            start = i
    return groups


def stack_layers(layers: Sequence[Mapping[str, Any]]):
    """Stack per-layer trees on a new leading axis (NumPy leaves stay on the host)."""
    if all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(layers[0])):
        return jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


class LayerStack(nnx.Module):
    """Layers ``first .. first + n - 1`` with stacked parameters, run by ``jax.lax.scan``.

    Example:
      >>> stack = LayerStack(cfg, range(7, 54), stacked_params, dense_fmt=..., expert_fmt=...)
      >>> x, cache = stack(x, positions, (cache, batch))
    """

    def __init__(self, cfg: ErnieConfig, layers: range, stacked: Mapping[str, Any], *,
                 dense_fmt: WeightFormat, expert_fmt: WeightFormat | None,
                 axis_name: str | None = None):
        self.first = layers.start
        self.num_layers = len(layers)
        self.layer = DecoderLayer(cfg, stacked, moe=cfg.is_moe_layer(layers.start),
                                  dense_fmt=dense_fmt, expert_fmt=expert_fmt,
                                  axis_name=axis_name)

    def _layer_at(self, graphdef, linear_state, layer_state, i) -> DecoderLayer:
        """Layer ``first + i``: its sliced small leaves, the whole stacks of its linears."""
        layer = nnx.merge(graphdef, linear_state, layer_state)
        for _, node in nnx.iter_graph(layer):
            if isinstance(node, Linear):
                node.layer = i
        return layer

    def __call__(self, x: jax.Array, positions: jax.Array,
                 kv: tuple[kvc.KVCache, kvc.PagedBatch] | None = None):
        linears = {path for path, node in nnx.iter_graph(self.layer) if isinstance(node, Linear)}
        graphdef, linear_state, state = nnx.split(
            self.layer, lambda path, _: tuple(path[:-1]) in linears, ...)
        local = jnp.arange(self.num_layers, dtype=jnp.int32)  # index into the stacks
        index = local + self.first  # index into the KV cache

        if kv is None:
            def body(x, xs):
                layer_state, i = xs
                x, _ = self._layer_at(graphdef, linear_state, layer_state, i)(x, positions)
                return x, None

            x, _ = jax.lax.scan(body, x, (state, local))
            return x, None

        cache, batch = kv

        def body_cached(carry, xs):
            x, cache = carry
            layer_state, i, at = xs
            layer = self._layer_at(graphdef, linear_state, layer_state, i)
            x, cache = layer(x, positions, (cache, at, batch))
            return (x, cache), None

        (x, cache), _ = jax.lax.scan(body_cached, (x, cache), (state, local, index))
        return x, cache
