"""Public weight-only quantized matmul ops and their implementation dispatch.

``implementation``: ``"pallas"`` (the Pallas kernel; on a CPU it runs in interpret mode, and
naming it never falls back silently), ``"xla"`` (the pure-jnp reference), or ``None`` (the Pallas
kernel on a GPU that supports the shape, the reference elsewhere).

The Pallas path is ``kernels.py`` (validation, x column order, tile table, config lookup in
``config.py`` / ``tuned/<device>.json``) over ``kernel_triton.py``, whose docstring gives the
computed function, its rounding and the measured reason for the backend; and, for WINT2 experts
held in fragment byte order (``byte_order="fragments"``, :func:`kernel_mosaic.to_fragments`), the
Mosaic GPU kernel ``kernel_mosaic.py`` (Hopper only; its docstring has its rounding and numbers).
"""

from __future__ import annotations

import jax

from . import reference
from .kernel_mosaic import expert_ffn_fragments, from_fragments, grouped_matmul_fragments
from .reference import Activation, Fmt

Implementation = str | None
ByteOrder = str  # "rows" | "fragments"


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def _kernels():
    from . import kernels  # imported lazily: the Pallas modules are heavier than the reference

    return kernels


def _layer_of(w: dict[str, jax.Array], layer) -> dict[str, jax.Array]:
    return w if layer is None else {name: leaf[layer] for name, leaf in w.items()}


def quant_matmul(x: jax.Array, w: dict[str, jax.Array], *, fmt: Fmt, k_order: str = "natural",
                 activation: Activation = None, row_scale: jax.Array | None = None,
                 out_dtype=None, implementation: Implementation = None,
                 layer: jax.Array | int | None = None) -> jax.Array:
    """``y = epilogue(x @ W)`` for a runtime-layout ``<linear>`` ``w`` (see jaxwint2/layout.py).

    Args:
      x: ``[M, K]`` bf16 or f32 activations.
      w: the linear's leaves (``weight`` / ``quant_weight`` + scales) in runtime layout.
      fmt: ``"bf16" | "wint8" | "wint4" | "wint2"``.
      k_order: WINT2 in-group K order of the checkpoint.
      activation: ``None`` or ``"swiglu"`` (``silu(y[:, :N/2]) * y[:, N/2:]``).
      row_scale: optional ``[M]`` factors applied to the output rows.
      out_dtype: defaults to ``x.dtype``.
      implementation: ``"pallas"``, ``"xla"`` or ``None`` (best available).
      layer: with every leaf of ``w`` stacked on a leading layer axis ``[L, ...]``, use layer
        ``layer`` (traced int) of the stack. The Pallas kernel reads that layer in place: under
        ``lax.scan``, slicing the stack outside the kernel would copy the layer's weights on
        every iteration (XLA materialises a custom call's sliced operand).
    """
    kw = dict(fmt=fmt, k_order=k_order, activation=activation, row_scale=row_scale,
              out_dtype=out_dtype)
    if implementation == "xla":
        return reference.quant_matmul_reference(x, _layer_of(w, layer), **kw)
    if implementation not in ("pallas", None):
        raise ValueError(f"implementation must be 'pallas', 'xla' or None, got {implementation!r}")
    if implementation is None and not _on_gpu():
        return reference.quant_matmul_reference(x, _layer_of(w, layer), **kw)
    try:
        return _kernels().quant_matmul(x, w, interpret=not _on_gpu(), layer=layer, **kw)
    except NotImplementedError:
        if implementation == "pallas":
            raise
        return reference.quant_matmul_reference(x, _layer_of(w, layer), **kw)


def _check_grouped_args(fmt: Fmt, implementation: Implementation, byte_order: ByteOrder) -> None:
    if byte_order not in ("rows", "fragments"):
        raise ValueError(f"byte_order must be 'rows' or 'fragments', got {byte_order!r}")
    if byte_order == "fragments" and fmt != "wint2":
        raise ValueError(f"byte_order='fragments' holds wint2 weights, got {fmt=}")
    if implementation not in ("pallas", "xla", None):
        raise ValueError(f"implementation must be 'pallas', 'xla' or None, got {implementation!r}")


def quant_grouped_matmul(x: jax.Array, w: dict[str, jax.Array], group_sizes: jax.Array, *,
                         fmt: Fmt, k_order: str = "natural", activation: Activation = None,
                         row_scale: jax.Array | None = None, out_dtype=None,
                         implementation: Implementation = None,
                         layer: jax.Array | int | None = None,
                         byte_order: ByteOrder = "rows") -> jax.Array:
    """Grouped (MoE) ``y[rows of e] = epilogue(x[rows of e] @ W[e])``; rows sorted by group.

    Args as :func:`quant_matmul`, plus ``group_sizes`` int32 ``[E]`` (rows per expert, in
    order; may sum to less than M, trailing rows are padding and come out as zeros), ``w``
    stacked ``[E, ...]`` (``[L, E, ...]`` with ``layer``), and ``byte_order``: ``"rows"`` (the
    checkpoint's packed rows) or, WINT2 only, ``"fragments"`` (bytes re-ordered by
    :func:`pallas_kernels.to_fragments` for the Mosaic GPU kernel, ``kernel_mosaic.py``).
    """
    _check_grouped_args(fmt, implementation, byte_order)
    kw = dict(fmt=fmt, k_order=k_order, activation=activation, row_scale=row_scale,
              out_dtype=out_dtype)

    def ref():
        rows = _layer_of(w, layer)
        if byte_order == "fragments":
            rows = from_fragments(rows)
        return reference.quant_grouped_matmul_reference(x, rows, group_sizes, **kw)

    if implementation == "xla" or (implementation is None and not _on_gpu()):
        return ref()
    try:
        if byte_order == "fragments":  # the Mosaic GPU kernel (Hopper only)
            return grouped_matmul_fragments(x, w, group_sizes, layer=layer, k_order=k_order,
                                            activation=activation, row_scale=row_scale,
                                            out_dtype=out_dtype)
        return _kernels().quant_grouped_matmul(x, w, group_sizes, interpret=not _on_gpu(),
                                               layer=layer, **kw)
    except NotImplementedError:
        if implementation == "pallas":
            raise
        return ref()


def quant_expert_ffn(x: jax.Array, w_up: dict[str, jax.Array], w_down: dict[str, jax.Array],
                     group_sizes: jax.Array, *, fmt: Fmt, k_order: str = "natural",
                     row_scale: jax.Array | None = None, out_dtype=None,
                     implementation: Implementation = None, layer: jax.Array | int | None = None,
                     byte_order: ByteOrder = "rows") -> jax.Array:
    """The MoE expert FFN ``row_scale * (swiglu(x @ W_up[e]) @ W_down[e])``, rows sorted by group.

    What :func:`quant_grouped_matmul` computes for the up_gate (``activation="swiglu"``, h in
    ``x.dtype``) and then for the down (``row_scale``, ``out_dtype``); args as there, ``w_up`` /
    ``w_down`` the two stacked linears (same format, same ``layer``). With fragment-ordered WINT2
    experts on the Mosaic GPU kernel it is one op (:func:`kernel_mosaic.expert_ffn_fragments`),
    which at a few rows hands a K-split up_gate's partial sums straight to the down's operand
    launch; otherwise two calls.
    """
    _check_grouped_args(fmt, implementation, byte_order)
    if (byte_order == "fragments" and implementation != "xla"
            and (implementation == "pallas" or _on_gpu())):
        try:
            return expert_ffn_fragments(x, w_up, w_down, group_sizes, row_scale=row_scale,
                                        out_dtype=out_dtype, layer=layer, k_order=k_order)
        except NotImplementedError:
            if implementation == "pallas":
                raise
    kw = dict(fmt=fmt, k_order=k_order, implementation=implementation, layer=layer,
              byte_order=byte_order)
    h = quant_grouped_matmul(x, w_up, group_sizes, activation="swiglu", **kw)
    return quant_grouped_matmul(h, w_down, group_sizes, row_scale=row_scale,
                                out_dtype=out_dtype, **kw)
