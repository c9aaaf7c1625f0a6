"""Convert a Paddle / HF / rank-sharded ERNIE-4.5 checkpoint to jaxwint2's runtime layout.

:func:`convert_checkpoint` streams one part (embedding, one decoder layer, final norm, lm_head)
at a time: read its tensors (:mod:`converters.keymap`), merge TP ranks, check it against
:mod:`jaxwint2.layout`, write it as its own Orbax checkpoint (:mod:`jaxwint2.checkpoint`), drop
it. Quantized tensors stay packed (WINT2 bytes and scales are copied, never expanded). The output
is built in a temporary sibling directory and renamed into place at the end, so an interrupted or
failed run leaves nothing at ``dst``.

:func:`iter_checkpoint` / :func:`load_checkpoint` give the same runtime tree without writing
anything, from a converted directory or straight from a source checkpoint.

Nothing here knows tensor names; the key table does.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import time
import uuid
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
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "chat_template.json")


@dataclasses.dataclass
class Summary:
    """What a conversion did (also stored in ``jaxwint2.json``)."""

    src: str
    dst: str
    source_format: str
    k_order: str
    parts: int = 0
    tensors_read: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped: list[str] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)
    rounded: list[str] = dataclasses.field(default_factory=list)
    unfused_mismatches: int = 0
    copied_files: list[str] = dataclasses.field(default_factory=list)

    def line(self) -> str:
        mb = 2**20
        return (f"converted {self.src} -> {self.dst}: {self.parts} parts, {self.tensors_read} "
                f"tensors, {self.bytes_read / mb:.1f} MiB read, {self.bytes_written / mb:.1f} MiB "
                f"written in {self.seconds:.1f} s; {len(self.skipped)} mtp tensors skipped, "
                f"{len(self.unknown)} unknown; WINT2 (column, byte) pairs where an unfused "
                f"multiply-add changes the code: {self.unfused_mismatches}")


# --------------------------------------------------------------------------------------------
# streaming the runtime tree out of a source checkpoint
# --------------------------------------------------------------------------------------------


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


class _Stream:
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


def _meta(ckpt: SourceCheckpoint, k_order: str) -> dict[str, Any]:
    return {"k_order": k_order, "source": str(ckpt.path.absolute()),
            "source_format": ckpt.source_format, "tp_size": 1, "source_tp_size": ckpt.tp_size}


def _check_k_order(k_order: str | None) -> None:
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
    _check_k_order(k_order)
    if checkpoint.is_converted(path):
        cfg, meta, parts = checkpoint.iter_params(path)
        return cfg, {**meta, "k_order": k_order or meta.get("k_order", "natural")}, parts
    ckpt = open_checkpoint(path)
    stream = _Stream(ckpt)

    def parts() -> Iterator[tuple[str, Tree]]:
        yield from stream
        stream.leftovers()

    return ckpt.config, _meta(ckpt, k_order or "natural"), parts()


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


# --------------------------------------------------------------------------------------------
# the converter
# --------------------------------------------------------------------------------------------


def _nbytes(tree: Tree) -> int:
    return sum(_nbytes(v) if isinstance(v, dict) else v.nbytes for v in tree.values())


def _copy_aux(ckpt: SourceCheckpoint, out: pathlib.Path) -> list[str]:
    copied = []
    search = [ckpt.path, *(r.path for r in ckpt.ranks if r.path != ckpt.path)]
    for name in AUX_FILES:
        for d in search:
            if (d / name).is_file():
                shutil.copy2(d / name, out / name)
                copied.append(name)
                break
    return copied


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                       k_order: str = "natural", force: bool = False,
                       progress: bool = True) -> Summary:
    """Convert ``src`` (Paddle / HF / ``rank*/``) into a jaxwint2 checkpoint at ``dst``.

    Args:
      src: source checkpoint directory.
      dst: output directory; must not exist unless ``force`` (then it is replaced at the end).
      k_order: WINT2 in-group K order recorded in the metadata (``"natural"``/``"shuffled"``).
      force: replace an existing ``dst``.
      progress: show a tqdm bar over the parts.

    Returns:
      A :class:`Summary` (tensors, bytes, time, skipped/unknown tensors, unfused-FMA exposure).

    Raises:
      CheckpointError: bad input (the message names file and tensor); ``dst`` is left untouched.

    Example:
      >>> s = convert_checkpoint("ERNIE-4.5-21B-A3B-Paddle", "ernie-21b-jaxwint2")  # doctest: +SKIP
      >>> print(s.line())  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _check_k_order(k_order)
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    ckpt = open_checkpoint(src)
    summary = Summary(src=str(ckpt.path), dst=str(dst), source_format=ckpt.source_format,
                      k_order=k_order)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        stream = _Stream(ckpt)
        parts = checkpoint.part_names(ckpt.config)
        bar = _progress(parts, progress)
        for part, sub in stream:
            bar.set_postfix_str(part)
            checkpoint.save_part(tmp, part, sub)
            summary.bytes_written += _nbytes(sub)
            summary.parts += 1
            del sub
            bar.update(1)
        bar.close()
        summary.skipped, summary.unknown = stream.leftovers()
        summary.rounded, summary.unfused_mismatches = stream.rounded, stream.unfused
        summary.copied_files = _copy_aux(ckpt, tmp)
        summary.tensors_read, summary.bytes_read = ckpt.reads, ckpt.bytes_read
        summary.seconds = time.perf_counter() - t0
        checkpoint.write_meta(tmp, {**_meta(ckpt, k_order), "summary": _summary_meta(summary)})
        _replace(tmp, dst, force)
    except BaseException:
        _remove(tmp)
        raise
    summary.seconds = time.perf_counter() - t0
    return summary


def _summary_meta(s: Summary) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["skipped"], d["rounded"] = len(s.skipped), len(s.rounded)  # counts: lists may be long
    return d


def _remove(tmp: pathlib.Path, attempts: int = 100) -> None:
    """Delete the temporary output, waiting out writer threads (Orbax/TensorStore) that an
    interrupt left running and that may still create files in it."""
    for _ in range(attempts):
        shutil.rmtree(tmp, ignore_errors=True)
        if not tmp.exists():
            return
        time.sleep(0.05)


def _replace(tmp: pathlib.Path, dst: pathlib.Path, force: bool) -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` (``force``) is moved aside, then removed."""
    if dst.exists():
        if not force:
            raise CheckpointError(f"{dst}: appeared during the conversion; not replaced")
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def _progress(parts: list[str], enabled: bool):
    from tqdm import tqdm

    return tqdm(total=len(parts), desc="convert", unit="part", disable=not enabled)
