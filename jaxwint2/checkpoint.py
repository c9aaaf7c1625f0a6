"""Orbax save/restore of a converted jaxwint2 checkpoint, one part at a time.

A converted checkpoint (``python -m jaxwint2.convert``, on-disk layout in :mod:`jaxwint2.layout`)
holds one Orbax PyTree checkpoint per *part*: ``embed``, ``layers/<i>``, ``final_norm`` and
(untied) ``lm_head``. This module owns the part names, the split of the runtime tree into parts
and back, the shape/dtype check of a part against :func:`jaxwint2.layout.layer_shapes`, the
metadata file, and the Orbax calls. Restored leaves are host NumPy arrays (bf16 as
``ml_dtypes.bfloat16``); putting them on devices is the caller's business.

It does not read source (Paddle / HF) checkpoints; :mod:`converters` does.

Example:
  >>> cfg, meta, parts = iter_params("ckpt-jaxwint2")  # doctest: +SKIP
  >>> for name, subtree in parts:                       # doctest: +SKIP
  ...     put_on_device(name, subtree)
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np

from . import layout
from .config import ErnieConfig

Tree = dict[str, Any]


# --------------------------------------------------------------------------------------------
# parts of the runtime tree
# --------------------------------------------------------------------------------------------


def part_names(cfg: ErnieConfig) -> list[str]:
    """Parts in streaming order: ``embed``, ``layers/0`` .. ``layers/L-1``, ``final_norm``,
    ``lm_head`` (untied only)."""
    names = ["embed", *(f"layers/{i}" for i in range(cfg.num_hidden_layers)), "final_norm"]
    return names if cfg.tie_word_embeddings else [*names, "lm_head"]


def layer_index(part: str) -> int | None:
    return int(part.split("/", 1)[1]) if part.startswith("layers/") else None


def part_shapes(cfg: ErnieConfig, part: str) -> Tree:
    """``jax.ShapeDtypeStruct`` subtree of one part (see :func:`jaxwint2.layout.param_shapes`)."""
    i = layer_index(part)
    if i is not None:
        if not 0 <= i < cfg.num_hidden_layers:
            raise ValueError(f"part {part!r}: the model has {cfg.num_hidden_layers} layers")
        return layout.layer_shapes(cfg, i)
    h, v = cfg.hidden_size, cfg.vocab_size
    if part == "embed":
        return {"weight": layout._s((v, h), "bfloat16")}
    if part == "final_norm":
        return {"weight": layout._s((h,), "float32")}
    if part == "lm_head" and not cfg.tie_word_embeddings:
        return {"weight": layout._s((h, v), "bfloat16")}
    raise ValueError(f"unknown part {part!r}")


def get_part(tree: Tree, part: str) -> Tree:
    i = layer_index(part)
    return tree["layers"][i] if i is not None else tree[part]


def assemble(cfg: ErnieConfig, parts: Iterable[tuple[str, Tree]]) -> Tree:
    """``(part, subtree)`` pairs -> the full runtime tree (every part must be present)."""
    tree: Tree = {"layers": [None] * cfg.num_hidden_layers}
    for name, sub in parts:
        i = layer_index(name)
        if i is not None:
            tree["layers"][i] = sub
        else:
            tree[name] = sub
    missing = [p for p in part_names(cfg)
               if (tree["layers"][layer_index(p)] if "/" in p else tree.get(p)) is None]
    if missing:
        raise ValueError(f"parts missing from the tree: {missing}")
    return tree


def check_part(cfg: ErnieConfig, part: str, subtree: Tree, *, expected: Tree | None = None) -> None:
    """Raise ``ValueError`` naming the leaf if ``subtree`` differs from the layout in structure,
    shape or dtype (``expected`` overrides the layout, e.g. for one TP rank's shapes)."""
    want = part_shapes(cfg, part) if expected is None else expected
    got_paths = dict(_leaves(subtree))
    want_paths = dict(_leaves(want))
    if set(got_paths) != set(want_paths):
        extra, miss = set(got_paths) - set(want_paths), set(want_paths) - set(got_paths)
        raise ValueError(f"part {part!r}: leaves differ from the layout "
                         f"(missing {sorted(miss)}, unexpected {sorted(extra)})")
    for path, w in want_paths.items():
        g = got_paths[path]
        if tuple(g.shape) != tuple(w.shape) or np.dtype(g.dtype) != np.dtype(w.dtype):
            raise ValueError(f"part {part!r} leaf {path}: got {np.dtype(g.dtype)} "
                             f"{list(g.shape)}, layout says {np.dtype(w.dtype)} {list(w.shape)}")


def _leaves(tree: Tree, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, p)
        else:
            yield p, v


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def is_converted(path: str | os.PathLike) -> bool:
    return (pathlib.Path(path) / layout.META_FILE).exists()


def write_meta(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    meta = {"format_version": layout.FORMAT_VERSION, **meta}
    (pathlib.Path(path) / layout.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    f = pathlib.Path(path) / layout.META_FILE
    meta = json.loads(f.read_text())
    if meta.get("format_version") != layout.FORMAT_VERSION:
        raise ValueError(f"{f}: format_version {meta.get('format_version')!r}; this jaxwint2 "
                         f"reads version {layout.FORMAT_VERSION}")
    return meta


def read_config(path: str | os.PathLike) -> ErnieConfig:
    return ErnieConfig.from_hf_config(json.loads((pathlib.Path(path) / "config.json").read_text()))


def _checkpointer():
    import orbax.checkpoint as ocp  # imported lazily: slow, and only needed for files

    return ocp, ocp.PyTreeCheckpointer()


def part_dir(path: str | os.PathLike, part: str) -> pathlib.Path:
    return pathlib.Path(path).absolute() / layout.PARAMS_DIR / part


def save_part(path: str | os.PathLike, part: str, subtree: Tree) -> None:
    """Write one part as an Orbax PyTree checkpoint under ``path/params/<part>``."""
    d = part_dir(path, part)
    d.parent.mkdir(parents=True, exist_ok=True)
    _, ckpt = _checkpointer()
    ckpt.save(d, subtree)


def restore_part(path: str | os.PathLike, part: str, cfg: ErnieConfig | None = None) -> Tree:
    """One part as host NumPy arrays (checked against the layout when ``cfg`` is given)."""
    ocp, ckpt = _checkpointer()
    d = part_dir(path, part)
    if not d.exists():
        raise FileNotFoundError(f"{d}: part {part!r} missing from the converted checkpoint")
    meta = ckpt.metadata(d)
    tree_meta = getattr(getattr(meta, "item_metadata", meta), "tree", None)
    if tree_meta is None:  # older Orbax returns the tree itself
        tree_meta = meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), dict(tree_meta))
    sub = ckpt.restore(d, restore_args=args)
    if cfg is not None:
        check_part(cfg, part, sub)
    return sub


def iter_params(path: str | os.PathLike) -> tuple[ErnieConfig, dict, Iterator[tuple[str, Tree]]]:
    """``(cfg, meta, iterator of (part, subtree))`` of a converted checkpoint, part by part."""
    meta = read_meta(path)
    cfg = read_config(path)
    return cfg, meta, ((p, restore_part(path, p, cfg)) for p in part_names(cfg))


def load_params(path: str | os.PathLike) -> tuple[ErnieConfig, Tree, dict]:
    """``(cfg, params, meta)``: the whole runtime tree of a converted checkpoint, on the host."""
    cfg, meta, parts = iter_params(path)
    return cfg, assemble(cfg, parts), meta
