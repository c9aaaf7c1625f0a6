"""Orbax save/restore of a converted jaxwint2 checkpoint, one part at a time.

A converted checkpoint (``python -m jaxwint2.convert``, on-disk layout in :mod:`jaxwint2.layout`)
holds one Orbax PyTree checkpoint per *part*: ``embed``, ``layers/<i>``, ``final_norm`` and
(untied) ``lm_head``. This module owns the part names, the split of the runtime tree into parts
and back, the shape/dtype check of a part against :func:`jaxwint2.layout.layer_shapes`, the
metadata file, and the Orbax calls. Restored leaves are host NumPy arrays (bf16 as
``ml_dtypes.bfloat16``); putting them on devices is the caller's business. A part of an older
conversion (``format_version`` 1, no ``code_a`` / ``code_b``) is checked against its own version's
layout and given those leaves as it is read (:func:`add_integer_codes`), so readers always see
today's layout.

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


def part_shapes(cfg: ErnieConfig, part: str, *, integer_codes: bool = True) -> Tree:
    """``jax.ShapeDtypeStruct`` subtree of one part (see :func:`jaxwint2.layout.param_shapes`;
    ``integer_codes=False``: WINT2 linears without ``code_a`` / ``code_b``)."""
    i = layer_index(part)
    if i is not None:
        if not 0 <= i < cfg.num_hidden_layers:
            raise ValueError(f"part {part!r}: the model has {cfg.num_hidden_layers} layers")
        return layout.layer_shapes(cfg, i, integer_codes=integer_codes)
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


def check_part(cfg: ErnieConfig, part: str, subtree: Tree, *, expected: Tree | None = None,
               integer_codes: bool | None = True) -> None:
    """Raise ``ValueError`` naming the leaf if ``subtree`` differs from the layout in structure,
    shape or dtype (``expected`` overrides the layout, e.g. for one TP rank's shapes).

    ``integer_codes``: WINT2 linears must hold ``code_a`` / ``code_b`` (``True``), must not
    (``False``: source tensors, a version-1 part), or may, linear by linear (``None``).
    """
    want = part_shapes(cfg, part) if expected is None else expected
    if integer_codes is False:
        want = layout.without_integer_codes(want)
    elif integer_codes is None:
        want = layout.match_integer_codes(want, subtree)
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
    if meta.get("format_version") not in layout.READABLE_FORMAT_VERSIONS:
        raise ValueError(f"{f}: format_version {meta.get('format_version')!r}; this jaxwint2 "
                         f"reads versions {list(layout.READABLE_FORMAT_VERSIONS)}")
    return meta


def add_integer_codes(tree: Tree) -> Tree:
    """``tree`` (a part, a linear, a whole tree) with ``code_a`` / ``code_b`` in every
    WINT2 ``<linear>`` that lacks them, fitted on the host from its ``code_scale`` /
    ``code_zp`` (:func:`pallas_kernels.kernel_mosaic.fit_integer_codes`, the loader's own fit;
    NumPy, any leading axes). Linears that hold them keep theirs; other leaves are shared."""
    if isinstance(tree, list):
        return [add_integer_codes(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if layout.is_wint2_linear(tree):
        if all(leaf in tree for leaf in layout.INTEGER_CODE_LEAVES):
            return tree
        from pallas_kernels.kernel_mosaic import fit_integer_codes  # lazy: heavy, host-only use

        fit = fit_integer_codes(np.asarray(tree["code_scale"]), np.asarray(tree["code_zp"]))
        return {**tree, **dict(zip(layout.INTEGER_CODE_LEAVES, fit, strict=True))}
    return {k: add_integer_codes(v) for k, v in tree.items()}


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


def restore_part(path: str | os.PathLike, part: str, cfg: ErnieConfig | None = None, *,
                 format_version: int = layout.FORMAT_VERSION) -> Tree:
    """One part as host NumPy arrays. With ``cfg``: checked against the layout of the
    checkpoint's ``format_version`` (its metadata's), then brought to today's (a version-1
    part's WINT2 linears get ``code_a`` / ``code_b``: :func:`add_integer_codes`)."""
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
        if format_version not in layout.READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{d}: format_version {format_version!r}; this jaxwint2 reads "
                             f"versions {list(layout.READABLE_FORMAT_VERSIONS)}")
        try:
            check_part(cfg, part, sub, integer_codes=format_version >= 2)
        except ValueError as e:
            raise ValueError(f"{d}: {e} (format_version {format_version})") from e
        if format_version < 2:
            sub = add_integer_codes(sub)
    return sub


def iter_params(path: str | os.PathLike) -> tuple[ErnieConfig, dict, Iterator[tuple[str, Tree]]]:
    """``(cfg, meta, iterator of (part, subtree))`` of a converted checkpoint, part by part, in
    today's layout whatever the checkpoint's (readable) ``format_version``."""
    meta = read_meta(path)
    cfg = read_config(path)
    version = meta["format_version"]
    return cfg, meta, ((p, restore_part(path, p, cfg, format_version=version))
                       for p in part_names(cfg))


def load_params(path: str | os.PathLike) -> tuple[ErnieConfig, Tree, dict]:
    """``(cfg, params, meta)``: the whole runtime tree of a converted checkpoint, on the host."""
    cfg, meta, parts = iter_params(path)
    return cfg, assemble(cfg, parts), meta
