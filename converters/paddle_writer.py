"""Write a runtime tree back as a FastDeploy/Paddle checkpoint: exact names, dtypes and shapes.

The inverse of the Paddle half of the key table, for fixtures, the demo and the quantizer:
WINT8/WINT4 linears re-packed with Paddle's ``weight_quantize`` placement
(:func:`converters.weight_only.pack_weight_only`), WINT2 tensors as stored (``super_scales`` bf16),
unquantized weights bf16, router ``[H, E]`` and correction bias ``[1, E]`` fp32, norms bf16
(fp32 where bf16 would round them). Files are sharded with ``model.safetensors.index.json``,
bf16 declared as ``BF16`` or Paddle's ``U16``, and optionally split into FastDeploy ``rank{r}/``
tensor-parallel directories (:func:`converters.tp.split_tp`).

Parts are produced one at a time (``params`` may be a callable ``part -> subtree``), so a
multi-GB synthetic checkpoint is written with one layer in memory.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from jaxwint2.checkpoint import get_part, layer_index, part_names
from jaxwint2.config import ErnieConfig
from jaxwint2.layout import linear_format

from .keymap import PADDLE_LAYER, PREFIX, Rule, _applies, _get
from .reader import INDEX_FILE
from .safetensors_io import SafetensorsWriter
from .tp import split_tp
from .weight_only import pack_weight_only

Tree = dict[str, Any]
BF16 = np.dtype(ml_dtypes.bfloat16)


def _bf16_or_f32(x: np.ndarray) -> np.ndarray:
    y = np.asarray(x).astype(BF16)
    return y if np.array_equal(y.astype(np.float32), np.asarray(x, np.float32)) else \
        np.asarray(x, np.float32)


def linear_tensors(prefix: str, lin: dict[str, np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """One runtime ``<linear>`` (no expert axis) -> its Paddle tensors."""
    fmt = linear_format(lin)
    if fmt == "bf16":
        yield f"{prefix}.weight", np.asarray(lin["weight"]).astype(BF16)
        return
    if fmt in ("wint8", "wint4"):
        q = np.asarray(lin["quant_weight"])
        if fmt == "wint4":  # runtime [K/2, N] nibbles (row 2i low) -> plain q [K, N]
            lo, hi = (q & 0xF).astype(np.int8) - 8, (q >> 4).astype(np.int8) - 8
            q = np.stack([lo, hi], axis=1).reshape(2 * q.shape[0], q.shape[1])
        yield f"{prefix}.quant_weight", pack_weight_only(q, bits=8 if fmt == "wint8" else 4)
        yield f"{prefix}.weight_scale", np.asarray(lin["weight_scale"]).astype(BF16)
        return
    yield f"{prefix}.quant_weight", np.asarray(lin["quant_weight"], np.uint8)
    yield f"{prefix}.weight_scale", np.asarray(lin["weight_scale"], np.uint8)
    yield f"{prefix}.super_scales", _bf16_or_f32(lin["super_scales"])
    yield f"{prefix}.code_scale", np.asarray(lin["code_scale"], np.float32)
    yield f"{prefix}.code_zp", np.asarray(lin["code_zp"], np.float32)


def _rule_tensors(rule: Rule, prefix: str, value) -> Iterator[tuple[str, np.ndarray]]:
    name = prefix + rule.names[0]
    if rule.hook == "paddle_linear":
        if "{e}" in name:
            n_exp = next(iter(value.values())).shape[0]
            for e in range(n_exp):
                yield from linear_tensors(name.format(e=e), {k: v[e] for k, v in value.items()})
        else:
            yield from linear_tensors(name, value)
    elif rule.hook == "norm":
        yield name, _bf16_or_f32(value)
    elif rule.hook == "router_in_out":
        yield name, np.asarray(value, np.float32)
    elif rule.hook == "correction_bias":
        yield name, np.asarray(value, np.float32).reshape(1, -1)
    else:
        raise ValueError(f"no Paddle writer for hook {rule.hook!r}")


def part_tensors(cfg: ErnieConfig, part: str, sub: Tree, *,
                 lm_head_out_in: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """Paddle ``(name, tensor)`` pairs of one runtime part (any TP slice of it)."""
    pre = PREFIX["paddle"]
    if part == "embed":
        yield f"{pre}embed_tokens.weight", np.asarray(sub["weight"]).astype(BF16)
    elif part == "final_norm":
        yield f"{pre}norm.weight", _bf16_or_f32(sub["weight"])
    elif part == "lm_head":
        w = np.asarray(sub["weight"]).astype(BF16)
        yield "lm_head.weight", np.ascontiguousarray(w.T) if lm_head_out_in else w
    else:
        i = layer_index(part)
        for rule in PADDLE_LAYER:
            if _applies(rule, cfg, i):
                yield from _rule_tensors(rule, f"{pre}layers.{i}.", _get(sub, rule.target))


def write_paddle_checkpoint(cfg: ErnieConfig, params: Tree | Callable[[str], Tree],
                            dst: str | os.PathLike, *, num_shards: int = 2,
                            bf16_header: str = "BF16", tp_size: int = 1,
                            extra_tensors: dict[str, np.ndarray] | None = None,
                            lm_head_out_in: bool = False) -> pathlib.Path:
    """Write ``params`` (runtime layout) as a Paddle checkpoint directory ``dst``.

    Args:
      cfg: model config; its ``to_hf_config()`` becomes ``config.json``.
      params: the runtime tree, or a callable giving one part's subtree (streamed writing).
      dst: output directory (created).
      num_shards: safetensors files per rank (with ``model.safetensors.index.json``; one file
        is written as ``model.safetensors`` without an index).
      bf16_header: declare bf16 tensors ``"BF16"`` or ``"U16"`` (Paddle's numpy has no bf16).
      tp_size: > 1 writes FastDeploy ``rank{r}/`` directories of tensor-parallel slices.
      extra_tensors: more tensors (e.g. ``mtp*`` or unknown ones) added to every rank.
      lm_head_out_in: store ``lm_head.weight`` as ``[V, H]`` (FastDeploy accepts both).

    Example:
      >>> write_paddle_checkpoint(cfg, random_params(cfg), "tiny-paddle", bf16_header="U16")
      ... # doctest: +SKIP
    """
    dst = pathlib.Path(dst)
    get = params if callable(params) else (lambda part: get_part(params, part))
    parts = part_names(cfg)
    rank_dirs = [dst / f"rank{r}" for r in range(tp_size)] if tp_size > 1 else [dst]
    files = (["model.safetensors"] if num_shards == 1 else
             [f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors" for s in range(num_shards)])
    writers, weight_maps = [], []
    for d in rank_dirs:
        d.mkdir(parents=True, exist_ok=True)
        writers.append([SafetensorsWriter(d / f, bf16_header=bf16_header) for f in files])
        weight_maps.append({})
        (d / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
             "pad_token_id": cfg.pad_token_id, "top_p": 0.8, "temperature": 0.8}) + "\n")
    for j, part in enumerate(parts):
        shard = j * num_shards // len(parts)
        sub = get(part)
        for r in range(len(rank_dirs)):
            piece = split_tp(cfg, part, sub, r, tp_size) if tp_size > 1 else sub
            for name, t in part_tensors(cfg, part, piece, lm_head_out_in=lm_head_out_in):
                writers[r][shard].add(name, t)
                weight_maps[r][name] = files[shard]
        del sub
    for r, d in enumerate(rank_dirs):
        for name, t in (extra_tensors or {}).items():
            writers[r][-1].add(name, t)
            weight_maps[r][name] = files[-1]
        for w in writers[r]:
            w.close()
        if num_shards > 1:
            total = sum((d / f).stat().st_size for f in files)
            (d / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_maps[r]}, indent=1))
    return dst
