"""jaxwint2's runtime weight layout: the one place that defines it.

Everything that produces parameters (the converter, ``jaxwint2.load``'s in-memory conversion, the
demo builder, the synthetic-weight benchmarks) produces exactly the tree that
:func:`param_shapes` describes, and the model consumes it. Nothing here reads files or runs math.

Tree (``L`` layers, ``E`` experts, ``H`` hidden, ``V`` vocab; ``y = x @ W`` with ``W [K, N]``)::

    embed/weight            bf16 [V, H]
    final_norm/weight       f32  [H]
    lm_head/weight          bf16 [H, V]            absent when tie_word_embeddings
    layers/<i>/             i = 0 .. L-1 (a list)
      input_norm/weight     f32  [H]
      post_attention_norm/weight  f32 [H]
      attn/qkv/<linear>     K=H, N=(n_heads + 2 n_kv) * head_dim, columns [Q | K | V]
      attn/o/<linear>       K=n_heads * head_dim, N=H
      mlp/ (dense layer)    up_gate/<linear> K=H, N=2I, columns [gate | up];  down/<linear> K=I, N=H
      mlp/ (MoE layer)      router/weight f32 [H, E];  router/bias f32 [E]  (correction bias)
                            experts/up_gate/<linear, stacked [E, ...]>  K=H, N=2 I_e, [gate | up]
                            experts/down/<linear, stacked [E, ...]>     K=I_e, N=H
                            shared/up_gate, shared/down  (if moe_num_shared_experts; width
                            n_shared * I_e, dense format)

A ``<linear>`` is one of (leading ``[E]`` on every leaf for stacked experts):

* ``bf16``:  ``weight`` bf16 ``[K, N]``
* ``wint8``: ``quant_weight`` int8 ``[K, N]`` (plain q, -127..127), ``weight_scale`` bf16 ``[N]``;
  ``W = q * scale``. (Paddle's interleaved byte placement is undone by the converter.)
* ``wint4``: ``quant_weight`` uint8 ``[K/2, N]``: row ``2i`` in the low nibble, ``2i+1`` in the
  high nibble, each stored as ``q + 8`` (0..15); ``weight_scale`` bf16 ``[N]``.
* ``wint2``: the FastDeploy tensors unchanged (lossless; :mod:`pallas_kernels.wint2` is the
  decode): ``quant_weight`` uint8 ``[K/4, N]``, ``weight_scale`` uint8 ``[ceil(K/128), N]``,
  ``super_scales`` f32 ``[N]`` (bf16 values widened exactly), ``code_scale`` f32 ``[N]``,
  ``code_zp`` f32 ``[N]``. The checkpoint-wide ``k_order`` (``"natural"`` / ``"shuffled"``,
  wint2-format §3.2) travels in the metadata; a shuffled checkpoint is run by permuting the
  activation columns, never by re-packing bytes.

On disk (``python -m jaxwint2.convert``)::

    DST/jaxwint2.json       metadata: format_version, source, source_format, k_order, tp_size
    DST/config.json, generation_config.json, tokenizer.model, tokenizer_config.json, ...
    DST/params/embed/, params/final_norm/, params/lm_head/, params/layers/<i>/
                            one Orbax PyTree checkpoint per top-level part and per layer, so the
                            converter streams one layer at a time and loaders can too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from .config import ErnieConfig, Format

FORMAT_VERSION = 1
META_FILE = "jaxwint2.json"
PARAMS_DIR = "params"

Shapes = dict[str, Any]


def _s(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def linear_shapes(fmt: Format, k: int, n: int, experts: int | None = None) -> Shapes:
    """Leaves of one ``<linear>`` of format ``fmt`` mapping ``k`` inputs to ``n`` outputs."""
    e = () if experts is None else (experts,)
    if fmt == "bf16":
        return {"weight": _s((*e, k, n), jnp.bfloat16)}
    if fmt == "wint8":
        return {"quant_weight": _s((*e, k, n), jnp.int8),
                "weight_scale": _s((*e, n), jnp.bfloat16)}
    if fmt == "wint4":
        if k % 2:
            raise ValueError(f"wint4 needs an even K, got {k=}")
        return {"quant_weight": _s((*e, k // 2, n), jnp.uint8),
                "weight_scale": _s((*e, n), jnp.bfloat16)}
    if fmt == "wint2":
        if k % 64:
            raise ValueError(f"wint2 needs K divisible by 64, got {k=}")
        return {"quant_weight": _s((*e, k // 4, n), jnp.uint8),
                "weight_scale": _s((*e, -(-k // 128), n), jnp.uint8),
                "super_scales": _s((*e, n), jnp.float32),
                "code_scale": _s((*e, n), jnp.float32),
                "code_zp": _s((*e, n), jnp.float32)}
    raise ValueError(f"unknown weight format {fmt!r}")


def linear_format(leaves: dict[str, Any]) -> Format:
    """The format of a ``<linear>`` dict, read off its leaf names and dtypes."""
    if "weight" in leaves:
        return "bf16"
    if "code_scale" in leaves:
        return "wint2"
    return "wint8" if leaves["quant_weight"].dtype == jnp.int8 else "wint4"


def layer_shapes(cfg: ErnieConfig, i: int) -> Shapes:
    h, d = cfg.hidden_size, cfg.dense_format
    attn = {"qkv": linear_shapes(d, h, cfg.q_size + 2 * cfg.kv_size),
            "o": linear_shapes(d, cfg.q_size, h)}
    if cfg.is_moe_layer(i):
        e, ie, fe = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.expert_format(i)
        mlp: Shapes = {
            "router": {"weight": _s((h, e), jnp.float32), "bias": _s((e,), jnp.float32)},
            "experts": {"up_gate": linear_shapes(fe, h, 2 * ie, e),
                        "down": linear_shapes(fe, ie, h, e)},
        }
        if cfg.moe_num_shared_experts:
            si = cfg.moe_num_shared_experts * ie
            mlp["shared"] = {"up_gate": linear_shapes(d, h, 2 * si),
                             "down": linear_shapes(d, si, h)}
    else:
        mlp = {"up_gate": linear_shapes(d, h, 2 * cfg.intermediate_size),
               "down": linear_shapes(d, cfg.intermediate_size, h)}
    return {"input_norm": {"weight": _s((h,), jnp.float32)},
            "post_attention_norm": {"weight": _s((h,), jnp.float32)},
            "attn": attn, "mlp": mlp}


def param_shapes(cfg: ErnieConfig) -> Shapes:
    """The full runtime tree as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
    tree: Shapes = {
        "embed": {"weight": _s((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16)},
        "layers": [layer_shapes(cfg, i) for i in range(cfg.num_hidden_layers)],
        "final_norm": {"weight": _s((cfg.hidden_size,), jnp.float32)},
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"weight": _s((cfg.hidden_size, cfg.vocab_size), jnp.bfloat16)}
    return tree


def flatten(tree: dict[str, Any], prefix: tuple[str, ...] = ()):
    """Yield ``(path, leaf)`` of a nested-dict tree, ``path`` a tuple of keys."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`: ``{path: leaf}`` -> nested dicts."""
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def count_params(cfg: ErnieConfig) -> int:
    """Logical parameter count (weights, not bytes): packed formats count their K x N weights."""
    total = 0

    def visit(node):
        nonlocal total
        if "quant_weight" in node or "weight" in node and len(node) == 1:
            w = node.get("weight", node.get("quant_weight"))
            shape = w.shape
            per_byte = {"bf16": 1, "wint8": 1, "wint4": 2, "wint2": 4}[linear_format(node)] \
                if "quant_weight" in node else 1
            n = 1
            for s in shape:
                n *= s
            total += n * per_byte
            return
        for v in node.values() if isinstance(node, dict) else node:
            if isinstance(v, dict | list):
                visit(v)
            else:
                total += v.size

    visit(param_shapes(cfg))
    return total
