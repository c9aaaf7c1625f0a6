"""``python -m converters.inspect DIR``: list a checkpoint's tensors (name, dtype, shape, size).

Works on source checkpoints (Paddle / HF / ``rank*/``; headers only, no tensor data is read) and
on converted jaxwint2 directories (Orbax metadata of every part). Ends with totals per dtype.
Knows nothing about what the tensors mean.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import numpy as np

from jaxwint2 import checkpoint

from .errors import CheckpointError
from .reader import open_checkpoint


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def source_rows(path: pathlib.Path):
    """``(name, dtype, shape, nbytes, file)`` of every tensor of a source checkpoint."""
    ckpt = open_checkpoint(path)
    for r, src in enumerate(ckpt.ranks):
        for name in sorted(src.keys()):
            t = src.info(name)
            label = f"rank{r}/{name}" if ckpt.tp_size > 1 else name
            yield label, t.dtype, t.shape, t.nbytes, t.file.name


def converted_rows(path: pathlib.Path):
    """The same for a converted jaxwint2 directory, from each part's Orbax metadata."""
    import orbax.checkpoint as ocp

    cfg = checkpoint.read_config(path)
    ckpt = ocp.PyTreeCheckpointer()
    for part in checkpoint.part_names(cfg):
        meta = ckpt.metadata(checkpoint.part_dir(path, part))
        tree = getattr(getattr(meta, "item_metadata", meta), "tree", meta)
        for leaf, m in checkpoint._leaves(dict(tree)):
            dtype = np.dtype(m.dtype)
            yield (f"{part}/{leaf}", str(dtype), tuple(m.shape),
                   int(np.prod(m.shape)) * dtype.itemsize, f"params/{part}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m converters.inspect", description=__doc__)
    p.add_argument("dir", type=pathlib.Path, help="checkpoint directory")
    p.add_argument("--filter", default="", help="only names containing this substring")
    args = p.parse_args(argv)
    try:
        if checkpoint.is_converted(args.dir):
            meta = checkpoint.read_meta(args.dir)
            print(f"# jaxwint2 checkpoint v{meta['format_version']}: k_order={meta['k_order']} "
                  f"source_format={meta['source_format']} source={meta['source']}")
            rows = list(converted_rows(args.dir))
        else:
            ckpt = open_checkpoint(args.dir)
            print(f"# {ckpt.source_format} checkpoint, {len(ckpt.ranks)} rank(s)")
            rows = list(source_rows(args.dir))
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    totals: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for name, dtype, shape, nbytes, where in rows:
        if args.filter not in name:
            continue
        print(f"{name:<72} {dtype:<9} {str(list(shape)):<20} {_size(nbytes):>10}  {where}")
        totals[dtype][0] += 1
        totals[dtype][1] += nbytes
    for dtype, (count, nbytes) in sorted(totals.items()):
        print(f"# {dtype}: {count} tensors, {_size(nbytes)}")
    print(f"# total: {sum(c for c, _ in totals.values())} tensors, "
          f"{_size(sum(b for _, b in totals.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
