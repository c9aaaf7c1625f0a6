"""FastDeploy's tensor-parallel split of the runtime tree, and its inverse.

``split_tp(cfg, part, subtree, rank, tp)`` gives rank ``rank``'s slice of one part exactly as a
FastDeploy ``rank{r}/`` checkpoint holds it (``shared/docs/ernie45-architecture.md``, last
section), in runtime layout; ``merge_tp`` puts the ranks' slices back together. The rules, per
``<linear>`` (``W [K, N]``):

* ``attn/qkv``: columns by heads; Q, K and V are split separately and concatenated per rank; with
  fewer kv heads than ranks, rank r holds kv head ``r * n_kv // tp`` (replicated).
* ``attn/o``, every ``down``: rows (K). Per-column leaves (WINT8/WINT4 ``weight_scale``, WINT2
  ``super_scales``/``code_scale``/``code_zp``/``code_a``/``code_b``) are the same on every rank.
  A WINT2 row slice re-packs its 4-bit group scales so the nibble parity restarts at the slice's
  first row.
* every ``up_gate`` (dense, shared, routed experts): gate and up halves split separately on I;
  rank r holds ``[gate_r | up_r]``.
* column splits take every leaf's columns, per-column ones (``code_a``/``code_b`` too) included.
  WINT2 linears may come with or without ``code_a``/``code_b`` (per column, so a slice's are
  the fit of its own columns); FastDeploy's ``rank{r}/`` files never hold them.
* ``embed``: vocab rows; ``lm_head``: vocab columns; norms and the router: replicated.

Leaves may be NumPy arrays or ``jax.ShapeDtypeStruct`` (then only shapes are computed, which is
how a rank's expected shapes are derived). Knows nothing about files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxwint2.checkpoint import layer_index, part_shapes
from jaxwint2.config import ErnieConfig
from jaxwint2.layout import INTEGER_CODE_LEAVES, linear_format
from jaxwint2.layout import flatten as _flatten
from jaxwint2.layout import unflatten as _unflatten
from pallas_kernels.wint2 import GROUP_SIZE

Tree = dict[str, Any]
_ROW_SPLIT = {("attn", "o"), ("mlp", "down"), ("mlp", "experts", "down"), ("mlp", "shared", "down")}
_GATE_UP = {("mlp", "up_gate"), ("mlp", "experts", "up_gate"), ("mlp", "shared", "up_gate")}


# --------------------------------------------------------------------------------------------
# how each leaf is split: a plan computed from the full (TP1) shapes, read by split and merge
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Replicated:
    """Every rank holds the whole leaf."""


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Rank r holds rows ``[r * R/tp, (r+1) * R/tp)`` of axis -2."""


@dataclasses.dataclass(frozen=True)
class _Columns:
    """Rank r holds the columns ``columns(r)`` of the last axis."""

    columns: Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Wint2ScaleRows:
    """WINT2 ``weight_scale`` of a K split: nibbles re-packed so parity restarts per slice."""

    k: int


Plan = _Replicated | _Rows | _Columns | _Wint2ScaleRows


def _qkv_columns(cfg: ErnieConfig, tp: int) -> Callable[[int], np.ndarray]:
    nh, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if nh % tp or (nkv % tp and tp % nkv):
        raise ValueError(f"attention heads {nh} (kv {nkv}) cannot be split over {tp} ranks")

    def columns(rank: int) -> np.ndarray:
        kv_heads = (range(rank * nkv // tp, (rank + 1) * nkv // tp) if nkv >= tp
                    else [rank * nkv // tp])
        q = [np.arange(h * d, (h + 1) * d) for h in range(rank * nh // tp, (rank + 1) * nh // tp)]
        k = [cfg.q_size + np.arange(h * d, (h + 1) * d) for h in kv_heads]
        v = [cfg.q_size + cfg.kv_size + np.arange(h * d, (h + 1) * d) for h in kv_heads]
        return np.concatenate(q + k + v)

    return columns


def _halves_columns(n: int, tp: int, what: str) -> Callable[[int], np.ndarray]:
    half = n // 2
    if n % 2 or half % tp:
        raise ValueError(f"{what}: [gate | up] width {n} does not split into {tp} ranks")
    s = half // tp
    return lambda r: np.concatenate([np.arange(r * s, (r + 1) * s),
                                     half + np.arange(r * s, (r + 1) * s)])


def _even(n: int, tp: int, what: str) -> None:
    if n % tp:
        raise ValueError(f"{what}: {n} does not split into {tp} ranks")


def _linear_plans(cfg, path: tuple[str, ...], lin: Tree, tp: int, what: str) -> dict[str, Plan]:
    fmt = linear_format(lin)
    main = lin.get("weight", lin.get("quant_weight"))
    kind = path[-2:] if path[-2] not in ("experts", "shared") else path[-3:]
    if kind in _ROW_SPLIT:
        k = main.shape[-2] * {"bf16": 1, "wint8": 1, "wint4": 2, "wint2": 4}[fmt]
        _even(k, tp, f"{what} K")
        if fmt == "wint4" and (k // tp) % 2:
            raise ValueError(f"{what}: K={k} over {tp} ranks leaves an odd WINT4 slice")
        if fmt == "wint2" and (k // tp) % GROUP_SIZE:
            raise ValueError(f"{what}: K={k} over {tp} ranks gives {k // tp} rows, not a "
                             f"multiple of the WINT2 group size {GROUP_SIZE}")
        plans: dict[str, Plan] = {}
        for name in lin:
            if name in ("weight", "quant_weight"):
                plans[name] = _Rows()
            elif name == "weight_scale" and fmt == "wint2":
                plans[name] = _Wint2ScaleRows(k)
            else:
                plans[name] = _Replicated()  # per-column: the same on every rank
        return plans
    if kind == ("attn", "qkv"):
        cols = _qkv_columns(cfg, tp)
    elif kind in _GATE_UP:
        cols = _halves_columns(main.shape[-1], tp, what)
    else:
        raise ValueError(f"{what}: no tensor-parallel rule for this linear")
    return {name: _Columns(cols) for name in lin}


def _plans(cfg: ErnieConfig, part: str, tp: int) -> dict[tuple[str, ...], Plan]:
    """Plan of every leaf of ``part`` (keyed by leaf path), from the layout's full shapes."""
    full = part_shapes(cfg, part)
    if part == "embed":
        _even(cfg.vocab_size, tp, "embed vocab")
        return {("weight",): _Rows()}
    if part == "lm_head":
        v = cfg.vocab_size
        _even(v, tp, "lm_head vocab")
        return {("weight",): _Columns(lambda r: np.arange(r * v // tp, (r + 1) * v // tp))}
    if part == "final_norm":
        return {("weight",): _Replicated()}
    if layer_index(part) is None:
        raise ValueError(f"unknown part {part!r}")
    plans: dict[tuple[str, ...], Plan] = {}

    def visit(node: Tree, path: tuple[str, ...]) -> None:
        for k, v in node.items():
            p = (*path, k)
            if _is_linear(v) and k != "router":
                for name, plan in _linear_plans(cfg, p, v, tp, f"{part}/{'/'.join(p)}").items():
                    plans[(*p, name)] = plan
            elif isinstance(v, dict):
                visit(v, p)
            else:
                plans[p] = _Replicated()  # norms, router weight and bias

    visit(full, ())
    return plans


def _present(plans: dict[tuple[str, ...], Plan], flat: dict) -> dict[tuple[str, ...], Plan]:
    """``plans`` less ``code_a``/``code_b`` of the WINT2 linears ``flat`` holds with neither."""
    drop: set[tuple[str, ...]] = set()
    for p in plans:
        if p[-1] == INTEGER_CODE_LEAVES[0]:
            pair = {(*p[:-1], leaf) for leaf in INTEGER_CODE_LEAVES}
            if not pair & set(flat):
                drop |= pair
    return {p: plan for p, plan in plans.items() if p not in drop}


def _is_linear(node) -> bool:
    """A ``<linear>`` dict (norms are ``{"weight": [H]}``: one axis, not a linear)."""
    if not isinstance(node, dict) or any(isinstance(v, dict) for v in node.values()):
        return False
    main = node.get("weight", node.get("quant_weight"))
    return main is not None and len(main.shape) >= 2


# --------------------------------------------------------------------------------------------
# applying a plan
# --------------------------------------------------------------------------------------------


def unpack_nibbles(ws: np.ndarray, groups: int) -> np.ndarray:
    """WINT2 ``weight_scale [..., ceil(G/2), N]`` -> group scales ``[..., G, N]`` (even = high)."""
    both = np.stack([ws >> 4, ws & 0xF], axis=-2)  # [..., G2, 2, N]
    return both.reshape(*ws.shape[:-2], 2 * ws.shape[-2], ws.shape[-1])[..., :groups, :]


def pack_nibbles(nib: np.ndarray) -> np.ndarray:
    """Group scales ``[..., G, N]`` (0..15) -> ``[..., ceil(G/2), N]`` bytes, even group high."""
    if nib.shape[-2] % 2:
        nib = np.concatenate([nib, np.zeros_like(nib[..., :1, :])], axis=-2)
    nib = nib.astype(np.uint8)
    return (nib[..., 0::2, :] << 4) | nib[..., 1::2, :]


def _split_leaf(x, plan: Plan, rank: int, tp: int):
    shape_only = isinstance(x, jax.ShapeDtypeStruct)
    if isinstance(plan, _Replicated):
        return x
    if isinstance(plan, _Columns):
        idx = plan.columns(rank)
        if shape_only:
            return jax.ShapeDtypeStruct((*x.shape[:-1], len(idx)), x.dtype)
        return np.ascontiguousarray(x[..., idx])
    if isinstance(plan, _Rows):
        s = x.shape[-2] // tp
        if shape_only:
            return jax.ShapeDtypeStruct((*x.shape[:-2], s, x.shape[-1]), x.dtype)
        return np.ascontiguousarray(x[..., rank * s:(rank + 1) * s, :])
    gs = plan.k // tp // GROUP_SIZE  # _Wint2ScaleRows
    if shape_only:
        return jax.ShapeDtypeStruct((*x.shape[:-2], -(-gs // 2), x.shape[-1]), x.dtype)
    nib = unpack_nibbles(np.asarray(x), plan.k // GROUP_SIZE)
    return pack_nibbles(nib[..., rank * gs:(rank + 1) * gs, :])


def _merge_leaf(xs: list, plan: Plan, tp: int, where: str):
    if isinstance(plan, _Replicated):
        for r, x in enumerate(xs[1:], 1):
            if not np.array_equal(np.asarray(x), np.asarray(xs[0])):
                raise ValueError(f"{where}: ranks 0 and {r} hold different values of a "
                                 "replicated tensor")
        return xs[0]
    if isinstance(plan, _Rows):
        return np.concatenate(xs, axis=-2)
    if isinstance(plan, _Columns):
        n = max(int(plan.columns(r).max()) for r in range(tp)) + 1
        out = np.empty((*xs[0].shape[:-1], n), xs[0].dtype)
        for r, x in enumerate(xs):
            out[..., plan.columns(r)] = x  # replicated kv heads are written once per holder
        return out
    gs = plan.k // tp // GROUP_SIZE  # _Wint2ScaleRows
    return pack_nibbles(np.concatenate([unpack_nibbles(np.asarray(x), gs) for x in xs], axis=-2))


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def split_tp(cfg: ErnieConfig, part: str, subtree: Tree, rank: int, tp: int) -> Tree:
    """Rank ``rank`` of ``tp``'s slice of one runtime part (rules in the module docstring).

    Args:
      cfg: the model config (TP1 shapes).
      part: ``"embed"``, ``"layers/<i>"``, ``"final_norm"`` or ``"lm_head"``.
      subtree: the part's TP1 leaves (NumPy arrays, or ``jax.ShapeDtypeStruct`` for shapes only).
      rank, tp: the rank and the number of ranks.

    Example:
      >>> rank1 = split_tp(cfg, "layers/3", params["layers"][3], 1, 4)  # doctest: +SKIP
    """
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} not in 0..{tp - 1}")
    flat = dict(_flatten(subtree))
    plans = _present(_plans(cfg, part, tp), flat)
    if set(flat) != set(plans):
        raise ValueError(f"part {part!r}: leaves {sorted(flat)} differ from the layout's "
                         f"{sorted(plans)}")
    return _unflatten({p: _split_leaf(x, plans[p], rank, tp) for p, x in flat.items()})


def rank_shapes(cfg: ErnieConfig, part: str, rank: int, tp: int, *,
                integer_codes: bool = True) -> Tree:
    """``ShapeDtypeStruct`` subtree of rank ``rank``'s slice of ``part`` (``integer_codes=False``:
    WINT2 linears without ``code_a``/``code_b``, as a ``rank{r}/`` source holds them)."""
    return split_tp(cfg, part, part_shapes(cfg, part, integer_codes=integer_codes), rank, tp)


def merge_tp(cfg: ErnieConfig, part: str, subtrees: list[Tree]) -> Tree:
    """Inverse of :func:`split_tp`: the ranks' slices of one part (in rank order) -> TP1 part.

    Leaves every rank holds whole (norms, router, per-column scales of a row split) must agree
    across ranks; a difference raises ``ValueError`` naming the leaf.
    """
    tp = len(subtrees)
    flats = [dict(_flatten(s)) for s in subtrees]
    plans = _present(_plans(cfg, part, tp), flats[0])
    for r, flat in enumerate(flats):
        if set(flat) != set(plans):
            raise ValueError(f"part {part!r} rank {r}: leaves {sorted(flat)} differ from the "
                             f"layout's {sorted(plans)}")
    return _unflatten({p: _merge_leaf([f[p] for f in flats], plan, tp, f"{part}/{'/'.join(p)}")
                    for p, plan in plans.items()})
