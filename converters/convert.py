"""Convert a Paddle / HF / rank-sharded ERNIE-4.5 checkpoint to jaxwint2's runtime layout.

:func:`convert_checkpoint` streams one part (embedding, one decoder layer, final norm, lm_head)
at a time out of :class:`converters.loader.PartStream` (key table, TP merge, layout check), writes
it as its own Orbax checkpoint (:mod:`jaxwint2.checkpoint`) and drops it. Quantized tensors stay
packed (WINT2 bytes and scales are copied, never expanded); WINT2 linears also get the integer
code step's ``code_a`` / ``code_b``, fitted per part on the host (``format_version`` 2,
:mod:`jaxwint2.layout`), so loading the result fits nothing: 4.3 s per million arbitrary fp32
columns, 0.02 s per million dyadic ones (CPU dev box, 2 cores, 2026-11-23; README, "Converting
a checkpoint"). The output is built in a temporary sibling directory and renamed into place at
the end, so an interrupted or failed run leaves nothing at ``dst``; an existing ``dst`` is
replaced only with ``force``.

Nothing here knows tensor names or the runtime tree's structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from jaxwint2 import checkpoint

from .errors import CheckpointError
from .loader import PartStream, check_k_order, source_meta
from .reader import SourceCheckpoint, open_checkpoint

Tree = dict[str, Any]
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
    check_k_order(k_order)
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    ckpt = open_checkpoint(src)
    summary = Summary(src=str(ckpt.path), dst=str(dst), source_format=ckpt.source_format,
                      k_order=k_order)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        stream = PartStream(ckpt)
        parts = checkpoint.part_names(ckpt.config)
        bar = _progress(parts, progress)
        for part, sub in stream:
            bar.set_postfix_str(part)
            with _signals_deferred():  # never leave Orbax writing into a deleted directory
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
        meta = {**source_meta(ckpt, k_order), "summary": _summary_meta(summary)}
        checkpoint.write_meta(tmp, meta)
        replace_dir(tmp, dst, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - t0
    return summary


def _summary_meta(s: Summary) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["skipped"], d["rounded"] = len(s.skipped), len(s.rounded)  # counts: lists may be long
    return d


@contextlib.contextmanager
def _signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one to its handler.

    An interrupt in the middle of an Orbax save would leave its TensorStore writes running in
    the background, recreating files inside the temporary directory after it is removed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signums}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if pending:
            handler = old[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def replace_dir(tmp: pathlib.Path, dst: pathlib.Path, force: bool, *,
                what: str = "the conversion") -> None:
    """Rename ``tmp`` to ``dst``; an existing ``dst`` (``force``) is moved aside, then removed."""
    if dst.exists():
        if not force:
            raise CheckpointError(f"{dst}: appeared during {what}; not replaced")
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dst)


def _progress(parts: list[str], enabled: bool):
    from tqdm import tqdm

    return tqdm(total=len(parts), desc="convert", unit="part", disable=not enabled)
