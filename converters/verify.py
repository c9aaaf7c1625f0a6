"""``python -m converters.verify SRC DST``: check a converted checkpoint against its source.

A separate pass from the conversion, streaming one part at a time from both sides: every leaf of
``DST`` (read with Orbax) must equal, bit for bit, the leaf the key table builds from ``SRC``
(Paddle / HF / ``rank*/``), and ``DST``'s config must describe the same model. WINT8/WINT4 leaves
are compared in runtime layout, so a placement error in either direction shows up as a byte
difference. Knows nothing about tensor names; :mod:`converters.keymap` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

import numpy as np

from jaxwint2 import checkpoint

from .errors import CheckpointError
from .loader import iter_checkpoint


def _leaves(tree, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, p)
        else:
            yield p, np.asarray(v)


def verify(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Differences between source and converted checkpoint (empty list: identical).

    Example:
      >>> assert verify("ERNIE-4.5-21B-A3B-Paddle", "ernie-21b-jaxwint2") == []  # doctest: +SKIP
    """
    if not checkpoint.is_converted(dst):
        raise CheckpointError(f"{dst}: not a converted jaxwint2 checkpoint (no jaxwint2.json)")
    cfg_src, _, src_parts = iter_checkpoint(src)
    cfg_dst, _, dst_parts = iter_checkpoint(dst)
    if cfg_src != cfg_dst:
        return [f"config differs: source {cfg_src} vs converted {cfg_dst}"]
    diffs = []
    for (name, a), (name_b, b) in zip(src_parts, dst_parts, strict=True):
        assert name == name_b, (name, name_b)
        la, lb = dict(_leaves(a)), dict(_leaves(b))
        if set(la) != set(lb):
            diffs.append(f"{name}: leaves differ ({sorted(set(la) ^ set(lb))})")
            continue
        for leaf, x in la.items():
            y = lb[leaf]
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{name}/{leaf}: {x.dtype} {list(x.shape)} vs {y.dtype} "
                             f"{list(y.shape)}")
            elif not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                bad = int((x.view(np.uint8) != y.view(np.uint8)).sum())
                diffs.append(f"{name}/{leaf}: {bad} bytes differ")
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.verify", description=__doc__)
    p.add_argument("src", help="source checkpoint (Paddle / HF / rank*/)")
    p.add_argument("dst", help="converted jaxwint2 checkpoint")
    args = p.parse_args(argv)
    try:
        diffs = verify(args.src, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for d in diffs:
        print(d)
    if diffs:
        print(f"FAILED: {args.dst} differs from {args.src} ({len(diffs)} differences)")
        return 1
    print(f"OK: {args.dst} matches {args.src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
