"""Weight formats: how a linear layer held in its checkpoint format runs its matmuls.

A :class:`WeightFormat` is the one strategy object every linear layer of the model goes through
(vLLM's ``QuantizeMethodBase``; gemma's ``IntEinsum`` as a drop-in for ``Einsum``): the layers
never branch on ``bf16`` / ``wint8`` / ``wint4`` / ``wint2``. It binds a format name, the
checkpoint's WINT2 in-group K order and the kernel implementation to the ops of
:mod:`pallas_kernels` (``quant_matmul``, ``quant_grouped_matmul``, ``dequantize``), whose
call signatures are the same for every format.

This module owns the user-facing ``kernels=`` switch (``"pallas"`` / ``"reference"`` /
``"auto"``) and its mapping to ``pallas_kernels``' ``implementation=``. Under ``"auto"``, fp32
activations take the reference path: the kernels feed tensor-core MMAs (bf16 operands), while
``dtype="float32"`` promises results that differ from an fp64 computation only by fp32
rounding. It does not know the bit layouts (``pallas_kernels``) nor the tree of a model
(``jaxwint2.layout``).

Example:
  >>> fmt = WeightFormat("wint2", kernels="reference")
  >>> y = fmt.matmul(x, w, activation="swiglu")          # x [M, K] -> y [M, N/2]
  >>> y = fmt.grouped_matmul(xs, w_experts, group_sizes)  # rows sorted by expert
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

import pallas_kernels

from . import layout
from .config import Format, KOrder

Kernels = Literal["pallas", "reference", "auto"]
KERNELS: tuple[str, ...] = ("pallas", "reference", "auto")
FORMATS: tuple[str, ...] = ("bf16", "wint8", "wint4", "wint2")

_IMPLEMENTATION = {"pallas": "pallas", "reference": "xla", "auto": None}


def implementation_for(kernels: str) -> str | None:
    """``kernels=`` -> ``pallas_kernels``' ``implementation=`` (``"auto"`` -> ``None``)."""
    if kernels not in _IMPLEMENTATION:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    return _IMPLEMENTATION[kernels]


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """A linear layer's storage format bound to a kernel implementation.

    Attributes:
      name: ``"bf16" | "wint8" | "wint4" | "wint2"`` (leaf layout in ``jaxwint2/layout.py``).
      kernels: ``"pallas"`` (Pallas kernels; interpret mode on CPU), ``"reference"`` (jnp decode
        + XLA) or ``"auto"`` (Pallas where the GPU supports the shape, reference elsewhere).
      k_order: WINT2 in-group K order of the checkpoint (``"natural"`` / ``"shuffled"``).
      byte_order: ``"rows"`` (packed rows as in the checkpoint) or ``"fragments"`` (WINT2
        experts re-ordered for the Mosaic GPU kernel: :func:`pallas_kernels.to_fragments`).
    """

    name: Format
    kernels: Kernels = "auto"
    k_order: KOrder = "natural"
    byte_order: str = "rows"

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ValueError(f"weight format name must be one of {FORMATS}, got {self.name!r}")
        implementation_for(self.kernels)
        if self.k_order not in ("natural", "shuffled"):
            raise ValueError(f"k_order must be 'natural' or 'shuffled', got {self.k_order!r}")
        if self.byte_order not in ("rows", "fragments"):
            raise ValueError(f"byte_order must be 'rows' or 'fragments', got {self.byte_order!r}")

    @property
    def implementation(self) -> str | None:
        return implementation_for(self.kernels)

    def implementation_for_input(self, x: jax.Array) -> str | None:
        """The ``implementation=`` this format uses for activations ``x`` (dtype-aware)."""
        if self.kernels == "auto" and x.dtype == jnp.float32:
            return "xla"  # exact fp32 dots; see the module docstring
        return self.implementation

    def param_shapes(self, k: int, n: int, experts: int | None = None) -> layout.Shapes:
        """Leaves of one linear (``[E, ...]`` stacked when ``experts``) as ShapeDtypeStructs."""
        return layout.linear_shapes(self.name, k, n, experts)

    def matmul(self, x: jax.Array, w: dict[str, jax.Array], *, activation=None,
               row_scale: jax.Array | None = None, out_dtype=None,
               layer: jax.Array | None = None) -> jax.Array:
        """``epilogue(x [M, K] @ W [K, N])`` with fp32 accumulation -> ``[M, N]`` (``N/2``).

        ``layer``: ``w`` is a layer stack ``[L, K, N]``; use its layer ``layer`` in place.
        """
        return pallas_kernels.quant_matmul(
            x, w, fmt=self.name, k_order=self.k_order, activation=activation,
            row_scale=row_scale, out_dtype=out_dtype,
            implementation=self.implementation_for_input(x), layer=layer)

    def grouped_matmul(self, x: jax.Array, w: dict[str, jax.Array], group_sizes: jax.Array, *,
                       activation=None, row_scale: jax.Array | None = None,
                       out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
        """Rows of ``x [M, K]`` sorted by expert; rows of expert e use ``W[e]``.

        ``group_sizes`` int32 ``[E]`` may sum to less than ``M`` (trailing rows: zeros).
        ``layer``: ``w`` is a layer stack ``[L, E, K, N]``; use its layer ``layer`` in place.
        """
        return pallas_kernels.quant_grouped_matmul(
            x, w, group_sizes, fmt=self.name, k_order=self.k_order, activation=activation,
            row_scale=row_scale, out_dtype=out_dtype,
            implementation=self.implementation_for_input(x), layer=layer,
            byte_order=self.byte_order)

    def expert_ffn(self, x: jax.Array, w_up: dict[str, jax.Array], w_down: dict[str, jax.Array],
                   group_sizes: jax.Array, *, row_scale: jax.Array | None = None,
                   out_dtype=None, layer: jax.Array | None = None) -> jax.Array:
        """The experts' SwiGLU FFN, ``grouped_matmul`` of ``w_up`` (``activation="swiglu"``)
        then of ``w_down`` (``row_scale``, ``out_dtype``); one op where the kernels fuse it."""
        return pallas_kernels.quant_expert_ffn(
            x, w_up, w_down, group_sizes, fmt=self.name, k_order=self.k_order,
            row_scale=row_scale, out_dtype=out_dtype,
            implementation=self.implementation_for_input(x), layer=layer,
            byte_order=self.byte_order)

    def dequantize(self, w: dict[str, jax.Array], dtype=jnp.bfloat16) -> jax.Array:
        """The dense ``[..., K, N]`` weight the matmuls compute with (tests, debugging)."""
        if self.byte_order == "fragments":
            w = pallas_kernels.from_fragments(w)
        return pallas_kernels.dequantize(w, self.name, k_order=self.k_order, dtype=dtype)
