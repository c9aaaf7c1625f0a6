"""``jaxwint2.load(path)``: a checkpoint directory -> a ready :class:`ErnieForCausalLM`.

``path`` is a converted jaxwint2 checkpoint (``python -m jaxwint2.convert``, Orbax parts) or a
Paddle / HF ERNIE-4.5 checkpoint directory, converted in memory; :func:`converters.iter_checkpoint`
reads either, one part (embedding, one layer, ...) at a time. Each layer goes straight into its
run's preallocated host buffer (:func:`jaxwint2.decoder.layer_groups`), so peak host memory is
about one copy of the weights, and each run is moved to the device once.

This module owns that assembly and the argument checks; it knows no file formats (converters)
and no model math (model).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from . import layout
from .decoder import layer_groups
from .model import ErnieForCausalLM, _check_dtype


def _stacked_buffers(cfg, groups) -> list[Any]:
    import jax

    def buffers(g):
        return jax.tree.map(lambda s: np.empty((len(g), *s.shape), s.dtype),
                            layout.layer_shapes(cfg, g.start))

    return [buffers(g) for g in groups]


def _fill(buffer, index: int, subtree, part: str) -> None:
    """Copy one layer's subtree into slot ``index`` of its run's stacked buffers."""
    import jax

    if jax.tree.structure(buffer) != jax.tree.structure(subtree):
        raise ValueError(f"checkpoint part {part!r} does not have the runtime layout's leaves "
                         "for this config (jaxwint2/layout.py)")

    def put(path, buf, leaf):
        leaf = np.asarray(leaf)
        if leaf.shape != buf.shape[1:]:
            raise ValueError(f"checkpoint part {part!r} leaf {jax.tree_util.keystr(path)} has "
                             f"shape {leaf.shape}, expected {buf.shape[1:]}")
        buf[index] = leaf

    jax.tree_util.tree_map_with_path(put, buffer, subtree)


def load(path: str | os.PathLike, *, kernels: str = "auto", tensor_parallel_size: int = 1,
         dtype: str = "bfloat16", k_order: str | None = None) -> ErnieForCausalLM:
    """Load an ERNIE-4.5 MoE checkpoint as a model.

    Args:
      path: converted jaxwint2 checkpoint, or Paddle / HF checkpoint directory.
      kernels: ``"pallas"``, ``"reference"`` or ``"auto"`` (:mod:`jaxwint2.formats`).
      tensor_parallel_size: devices to shard over; > 1 returns a
        :class:`jaxwint2.parallel.TPModel` (same API) whatever the checkpoint's own TP size.
      dtype: activation / compute dtype, ``"bfloat16"`` or ``"float32"``.
      k_order: override the WINT2 in-group K order (default: the checkpoint's metadata).

    Returns:
      An :class:`ErnieForCausalLM`; ``model(token_ids)`` gives fp32 logits.

    Example:
      >>> model = jaxwint2.load("ERNIE-4.5-21B-A3B-Paddle", dtype="bfloat16")
    """
    from .formats import implementation_for

    implementation_for(kernels)
    dtype = _check_dtype(dtype)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive int, got "
                         f"{tensor_parallel_size!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"path {str(path)!r} is not a checkpoint directory")
    if tensor_parallel_size > 1:  # sharded over a ("tp",) mesh: same API, see jaxwint2.parallel
        from .parallel import load_tensor_parallel

        return load_tensor_parallel(path, tensor_parallel_size, kernels=kernels, dtype=dtype,
                                    k_order=k_order)

    import converters  # lazily: converters imports jaxwint2's config/layout

    cfg, meta, parts = converters.iter_checkpoint(path, k_order=k_order)
    groups = layer_groups(cfg)
    group_of = {i: (gi, i - g.start) for gi, g in enumerate(groups) for i in g}
    stacks = _stacked_buffers(cfg, groups)
    params: dict[str, Any] = {}
    seen: set[int] = set()
    for part, subtree in parts:
        if part.startswith("layers/"):
            i = int(part.split("/", 1)[1])
            gi, j = group_of[i]
            _fill(stacks[gi], j, subtree, part)
            seen.add(i)
        else:
            params[part] = subtree
    missing = sorted(set(range(cfg.num_hidden_layers)) - seen)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} has no layer(s) {missing[:5]}")
    for part in ("embed", "final_norm") + (() if cfg.tie_word_embeddings else ("lm_head",)):
        if part not in params:
            raise ValueError(f"checkpoint {str(path)!r} has no {part!r}")
    params["layer_stacks"] = stacks
    return ErnieForCausalLM(cfg, params, kernels=kernels, dtype=dtype,
                            k_order=meta.get("k_order", "natural"), donate_stacks=True)
