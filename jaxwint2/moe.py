"""The MoE feed-forward block: FastDeploy's router, sort-by-expert dispatch, grouped expert FFN.

Routing (``wint2-format.md`` §5), all in fp32:
``p = softmax(x32 @ W_router)``; the top-k experts are chosen on ``p + e_score_correction_bias``
(the bias, ~20-60 with a tiny spread, is never rounded to bf16; ties go to the lower expert id);
the combine weights are the *unbiased* ``p`` of the chosen experts divided by their sum (clamped
at 1e-12). Shared experts, if any, are a dense SwiGLU added with weight 1.

Dispatch: the ``N * k`` (token, choice) pairs are sorted by expert (a static ``N * k`` rows, so
shapes never depend on the routing), ``group_sizes`` is the bincount of the chosen experts, and
the experts run as two grouped matmuls: ``up_gate`` with the SwiGLU epilogue and ``down`` with
the routing weights as the per-row scale (fp32 output). The combine un-sorts with a gather and
sums the ``k`` rows of each token in fp32. No all-experts dense computation anywhere.

This module knows nothing of the weight formats (the expert ``Linear`` does) nor of attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .formats import WeightFormat
from .layers import Linear, SwiGLU

ROUTER_NORM_MIN = 1e-12


def route(x: jax.Array, router_weight: jax.Array, bias: jax.Array,
          k: int) -> tuple[jax.Array, jax.Array]:
    """FastDeploy's aux-free top-k routing.

    Args:
      x: ``[N, H]`` activations (any float dtype; widened to fp32).
      router_weight: fp32 ``[H, E]``.
      bias: fp32 ``[E]`` ``e_score_correction_bias`` (selection only).
      k: experts per token.

    Returns:
      ``(weights fp32 [N, k], experts int32 [N, k])``; ``weights`` sum to 1 per token.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_weight.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    # lax.top_k is stable: among equal scores the lower index comes first.
    _, experts = jax.lax.top_k(probs + bias.astype(jnp.float32), k)  # [N, k]
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), ROUTER_NORM_MIN)
    return weights, experts.astype(jnp.int32)


class Dispatch:
    """The sort-by-expert permutation of one batch of routed tokens (plain arrays, traced).

    ``order`` lists the flat (token, choice) pairs sorted by expert (stable: token order within
    an expert), ``group_sizes`` counts rows per expert, and ``inverse`` undoes the sort.
    """

    def __init__(self, experts: jax.Array, num_experts: int):
        n, k = experts.shape
        flat = experts.reshape(n * k)
        self.k = k
        self.order = jnp.argsort(flat, stable=True)  # [N*k]
        self.inverse = jnp.argsort(self.order)        # [N*k]
        self.token = self.order // k                  # source token of each sorted row
        self.group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # [E]

    def sort(self, x: jax.Array) -> jax.Array:
        """``x [N, H]`` -> ``[N*k, H]`` rows grouped by expert."""
        return jnp.take(x, self.token, axis=0)

    def sort_flat(self, values: jax.Array) -> jax.Array:
        """Per-(token, choice) ``values [N, k]`` -> ``[N*k]`` in sorted order."""
        return jnp.take(values.reshape(-1), self.order)

    def combine(self, y_sorted: jax.Array) -> jax.Array:
        """``[N*k, H]`` sorted expert outputs -> ``[N, H]`` fp32 sum over each token's k rows."""
        y = jnp.take(y_sorted.astype(jnp.float32), self.inverse, axis=0)
        return y.reshape(-1, self.k, y.shape[-1]).sum(axis=1)


class MoE(nnx.Module):
    """Routed experts (+ shared experts) of one MoE decoder layer.

    Example:
      >>> moe = MoE(params["layers"][7]["mlp"], k=8, expert_fmt=WeightFormat("wint2"),
      ...           dense_fmt=WeightFormat("wint8"))
      >>> y = moe(x)  # [B, T, H] -> [B, T, H]
    """

    def __init__(self, params: Mapping[str, Any], *, k: int, expert_fmt: WeightFormat,
                 dense_fmt: WeightFormat, axis_name: str | None = None):
        self.router_weight = nnx.Param(jnp.asarray(params["router"]["weight"], jnp.float32))
        self.router_bias = nnx.Param(jnp.asarray(params["router"]["bias"], jnp.float32))
        self.up_gate = Linear(params["experts"]["up_gate"], expert_fmt)
        self.down = Linear(params["experts"]["down"], expert_fmt)
        self.shared = SwiGLU(params["shared"], dense_fmt) if "shared" in params else None
        self.k = int(k)
        self.axis_name = axis_name

    @property
    def num_experts(self) -> int:
        return self.router_weight.shape[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, T, H]`` -> ``[B, T, H]`` in ``x.dtype``."""
        b, t, h = x.shape
        tokens = x.reshape(b * t, h)
        with jax.named_scope("router"):
            weights, experts = route(tokens, self.router_weight[...], self.router_bias[...],
                                     self.k)
        with jax.named_scope("dispatch"):
            dispatch = Dispatch(experts, self.num_experts)
            x_sorted = dispatch.sort(tokens)  # [N*k, H]
            row_scale = dispatch.sort_flat(weights)
        with jax.named_scope("experts"):
            y_sorted = self.up_gate.expert_ffn(self.down, x_sorted, dispatch.group_sizes,
                                               row_scale=row_scale)  # [N*k, H] fp32
        with jax.named_scope("combine"):
            y = dispatch.combine(y_sorted)  # [N, H] fp32
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(tokens).astype(jnp.float32)
        if self.axis_name is not None:
            y = jax.lax.psum(y, self.axis_name)
        return y.astype(x.dtype).reshape(b, t, h)
