"""Load the runtime tree, one part at a time, from a source or a converted checkpoint.

:func:`iter_checkpoint` / :func:`load_checkpoint` are what the model loads with: from a converted
jaxwint2 directory they read the Orbax parts (:mod:`jaxwint2.checkpoint`); from a Paddle / HF /
``rank*/`` checkpoint they build the same tree in memory through the key table
(:mod:`converters.keymap`), rank slices merged to TP1. :class:`PartStream` is that in-memory
build, with the bookkeeping the converter reports: tensors consumed, skipped (``mtp*``) and
unknown (warned), values rounded to reach the runtime dtype, and the WINT2 columns' exposure to an
unfused multiply-add (:func:`count_unfused`).

Writes nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxwint2 import checkpoint
from jaxwint2.config import ErnieConfig
from pallas_kernels.wint2 import wint2_codes_exact

from .errors import CheckpointError
from .keymap import build_part, ignored_names
from .reader import SourceCheckpoint, open_checkpoint

Tree = dict[str, Any]
K_ORDERS = ("natural", "shuffled")


def _wint2_linears(tree: Tree) -> Iterator[Tree]:
    for v in tree.values():
        if isinstance(v, dict):
            if "code_scale" in v:
                yield v
            else:
                yield from _wint2_linears(v)


def unfused_mismatches(subtree: Tree) -> int:
    """(column, byte) pairs of the part's WINT2 linears exposed to an unfused multiply-add."""
    return sum(count_unfused(lin["code_scale"], lin["code_zp"]) for lin in _wint2_linears(subtree))


def count_unfused(code_scale, code_zp, *, chunk: int = 4096) -> int:
    """:func:`pallas_kernels.count_unfused_mismatches`, in bounded memory and fast enough
    for ERNIE-300B (~460k columns per expert linear).

    * Columns whose ``code_scale`` has at most 16 significant bits have exact ``u * cs``
      products in fp32: fused and unfused evaluation round once, identically. Skipped.
    * Columns sharing a ``(code_scale, code_zp)`` pair are counted once, times their number.
    * Fused and unfused fp32 values differ by about an ulp, so codes can only differ where
      ``u * cs + zp + 0.5`` lies within a few ulps of an integer; only those pairs get the exact
      (slow) evaluation.
    """
    cs = np.asarray(code_scale, np.float32).reshape(-1)
    zp = np.asarray(code_zp, np.float32).reshape(-1)
    wide = (cs.view(np.uint32) & 0xFF) != 0
    if not wide.any():
        return 0
    pairs, counts = np.unique(np.stack([cs[wide], zp[wide]], axis=1), axis=0, return_counts=True)
    u32 = np.arange(256, dtype=np.float32)[None, :]
    total = 0
    for lo in range(0, len(pairs), chunk):
        c = pairs[lo:lo + chunk, :1].astype(np.float32)
        z = pairs[lo:lo + chunk, 1:].astype(np.float32)
        v = u32 * c + z + np.float32(0.5)  # [chunk, 256] unfused fp32: within 2 ulps of exact
        near = np.abs(v - np.rint(v)) <= 4 * np.spacing(np.abs(v))
        if not near.any():
            continue
        rows, cols = np.nonzero(near)
        u = u32[0, cols]
        exact = wint2_codes_exact(u, c[rows, 0], z[rows, 0])
        unfused = np.floor(u * c[rows, 0] + z[rows, 0] + np.float32(0.5)).astype(np.int32)
        total += int(((exact != unfused) * counts[lo + rows]).sum())
    return total


class PartStream:
    """Iterate the parts of a source checkpoint and keep the bookkeeping of what was read."""

    def __init__(self, ckpt: SourceCheckpoint):
        self.ckpt = ckpt
        self.consumed: set[str] = set()
        self.rounded: list[str] = []
        self.unfused = 0

    def __iter__(self) -> Iterator[tuple[str, Tree]]:
        for part in checkpoint.part_names(self.ckpt.config):
            sub, fetches = build_part(self.ckpt, part)
            for f in fetches:
                self.consumed |= f.consumed
                self.rounded += f.rounded
            self.unfused += unfused_mismatches(sub)
            yield part, sub

    def leftovers(self) -> tuple[list[str], list[str]]:
        """``(skipped, unknown)`` names; warns about the unknown ones."""
        skipped = sorted(ignored_names(self.ckpt))
        names = set().union(*(r.keys() for r in self.ckpt.ranks))
        unknown = sorted(names - self.consumed - set(skipped))
        if unknown:
            more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
            warnings.warn(f"{self.ckpt.path}: {len(unknown)} unknown tensors ignored: "
                          f"{', '.join(unknown[:20])}{more}", stacklevel=3)
        return skipped, unknown


def source_meta(ckpt: SourceCheckpoint, k_order: str) -> dict[str, Any]:
    return {"k_order": k_order, "source": str(ckpt.path.absolute()),
            "source_format": ckpt.source_format, "tp_size": 1, "source_tp_size": ckpt.tp_size}


def check_k_order(k_order: str | None) -> None:
    if k_order is not None and k_order not in K_ORDERS:
        raise CheckpointError(f"k_order must be one of {K_ORDERS}, got {k_order!r}")


def iter_checkpoint(path: str | os.PathLike, *, k_order: str | None = None
                    ) -> tuple[ErnieConfig, dict[str, Any], Iterator[tuple[str, Tree]]]:
    """``(cfg, meta, iterator of (part, subtree))``, one part in memory at a time.

    ``path`` is a converted jaxwint2 directory (read with Orbax) or a Paddle / HF / ``rank*/``
    source checkpoint (converted on the fly; ranks merged to TP1). Parts come in the order of
    :func:`jaxwint2.checkpoint.part_names`; leaves are host NumPy arrays of the runtime layout.
    ``k_order`` overrides the stored WINT2 K order (default: the converted metadata's, else
    ``"natural"``).

    Example:
      >>> cfg, meta, parts = iter_checkpoint("ERNIE-4.5-300B-A47B-2Bits-Paddle")  # doctest: +SKIP
      >>> for name, sub in parts:  # doctest: +SKIP
      ...     device_tree[name] = jax.device_put(sub, shardings[name])
    """
    check_k_order(k_order)
    if checkpoint.is_converted(path):
        cfg, meta, parts = checkpoint.iter_params(path)
        return cfg, {**meta, "k_order": k_order or meta.get("k_order", "natural")}, parts
    ckpt = open_checkpoint(path)
    stream = PartStream(ckpt)

    def parts() -> Iterator[tuple[str, Tree]]:
        yield from stream
        stream.leftovers()

    return ckpt.config, source_meta(ckpt, k_order or "natural"), parts()


def load_checkpoint(path: str | os.PathLike, *, k_order: str | None = None
                    ) -> tuple[ErnieConfig, Tree, dict[str, Any]]:
    """``(cfg, params, meta)``: the full runtime tree (:func:`jaxwint2.layout.param_shapes`
    structure, NumPy leaves), from a converted or a source checkpoint (see
    :func:`iter_checkpoint`). ``meta`` has at least ``k_order``, ``source``, ``source_format``.

    Example:
      >>> cfg, params, meta = load_checkpoint("tiny-jaxwint2")  # doctest: +SKIP
    """
    cfg, meta, parts = iter_checkpoint(path, k_order=k_order)
    return cfg, checkpoint.assemble(cfg, parts), meta
