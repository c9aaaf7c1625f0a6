"""jaxwint2's runtime weight layout: the one place that defines it.

Everything that produces parameters (the converter, ``jaxwint2.load``'s in-memory conversion, the
demo builder, the synthetic-weight benchmarks) produces exactly the tree that
:func:`param_shapes` describes, and the model consumes it (the benchmarks leave WINT2's derived
``code_a`` / ``code_b`` out, so the model fits them per ``--code-step``; see ``wint2`` below).
Nothing here reads files or runs math.

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
  ``code_zp`` f32 ``[N]``; and the integer code step's ``code_a``, ``code_b`` int32 ``[N]``
  (shaped like ``code_scale``; :data:`INTEGER_CODE_LEAVES`): per column,
  ``code(u) == (u * code_a + code_b) >> 16`` (mod 2^32) for every byte u, ``code_a == 0`` where
  the column has no such pair (``pallas_kernels.wint2.affine_codes``; only the Mosaic GPU
  kernel reads them, the other paths ignore them). They are derived, not source tensors: the
  converter fits them per layer (``pallas_kernels.kernel_mosaic.fit_integer_codes``) and stores
  them (``format_version`` 2), the loaders return them (fitting them for a version-1 conversion
  or a Paddle / HF source), and the model accepts a linear with both or neither (then the Mosaic
  path fits them at load; :func:`match_integer_codes`). Paddle checkpoints never hold them.
  The checkpoint-wide ``k_order`` (``"natural"`` / ``"shuffled"``, wint2-format §3.2) travels in
  the metadata; a shuffled checkpoint is run by permuting the activation columns, never by
  re-packing bytes.

On disk (``python -m jaxwint2.convert``)::

    DST/jaxwint2.json       metadata: format_version (2; 1 = without code_a / code_b, still
                            read), source, source_format, k_order, tp_size
    DST/config.json, generation_config.json, tokenizer.model, tokenizer_config.json, ...
    DST/params/embed/, params/final_norm/, params/lm_head/, params/layers/<i>/
                            one Orbax PyTree checkpoint per top-level part and per layer, so the
                            converter streams one layer at a time and loaders can too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.kernel_mosaic import INTEGER_CODE_LEAVES  # the kernel reads them

from .config import ErnieConfig, Format

FORMAT_VERSION = 2
"""What the converter writes. 2: WINT2 linears store ``code_a`` / ``code_b``."""
READABLE_FORMAT_VERSIONS = (1, 2)
"""What the loaders read; a version-1 part gets ``code_a`` / ``code_b`` fitted as it is read."""
META_FILE = "jaxwint2.json"
PARAMS_DIR = "params"

Shapes = dict[str, Any]


def _s(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), jnp.dtype(dtype))


def linear_shapes(fmt: Format, k: int, n: int, experts: int | None = None, *,
                  integer_codes: bool = True) -> Shapes:
    """Leaves of one ``<linear>`` of format ``fmt`` mapping ``k`` inputs to ``n`` outputs.

    ``integer_codes=False``: a WINT2 linear without ``code_a`` / ``code_b`` (its source tensors,
    a version-1 conversion, a tree the Mosaic path fits them for).
    """
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
        leaves = {"quant_weight": _s((*e, k // 4, n), jnp.uint8),
                  "weight_scale": _s((*e, -(-k // 128), n), jnp.uint8),
                  "super_scales": _s((*e, n), jnp.float32),
                  "code_scale": _s((*e, n), jnp.float32),
                  "code_zp": _s((*e, n), jnp.float32)}
        if integer_codes:
            leaves.update({leaf: _s((*e, n), jnp.int32) for leaf in INTEGER_CODE_LEAVES})
        return leaves
    raise ValueError(f"unknown weight format {fmt!r}")


def linear_format(leaves: dict[str, Any]) -> Format:
    """The format of a ``<linear>`` dict, read off its leaf names and dtypes."""
    if "weight" in leaves:
        return "bf16"
    if "code_scale" in leaves:
        return "wint2"
    return "wint8" if leaves["quant_weight"].dtype == jnp.int8 else "wint4"


def layer_shapes(cfg: ErnieConfig, i: int, *, integer_codes: bool = True) -> Shapes:
    h, d = cfg.hidden_size, cfg.dense_format

    def lin(fmt, k, n, experts=None):
        return linear_shapes(fmt, k, n, experts, integer_codes=integer_codes)

    attn = {"qkv": lin(d, h, cfg.q_size + 2 * cfg.kv_size), "o": lin(d, cfg.q_size, h)}
    if cfg.is_moe_layer(i):
        e, ie, fe = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.expert_format(i)
        mlp: Shapes = {
            "router": {"weight": _s((h, e), jnp.float32), "bias": _s((e,), jnp.float32)},
            "experts": {"up_gate": lin(fe, h, 2 * ie, e), "down": lin(fe, ie, h, e)},
        }
        if cfg.moe_num_shared_experts:
            si = cfg.moe_num_shared_experts * ie
            mlp["shared"] = {"up_gate": lin(d, h, 2 * si), "down": lin(d, si, h)}
    else:
        mlp = {"up_gate": lin(d, h, 2 * cfg.intermediate_size),
               "down": lin(d, cfg.intermediate_size, h)}
    return {"input_norm": {"weight": _s((h,), jnp.float32)},
            "post_attention_norm": {"weight": _s((h,), jnp.float32)},
            "attn": attn, "mlp": mlp}


def param_shapes(cfg: ErnieConfig, *, integer_codes: bool = True) -> Shapes:
    """The full runtime tree as ``jax.ShapeDtypeStruct`` leaves (no memory)."""
    tree: Shapes = {
        "embed": {"weight": _s((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16)},
        "layers": [layer_shapes(cfg, i, integer_codes=integer_codes)
                   for i in range(cfg.num_hidden_layers)],
        "final_norm": {"weight": _s((cfg.hidden_size,), jnp.float32)},
    }
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"weight": _s((cfg.hidden_size, cfg.vocab_size), jnp.bfloat16)}
    return tree


def is_wint2_linear(node: Any) -> bool:
    """Whether ``node`` is a WINT2 ``<linear>`` dict (arrays or shapes)."""
    return isinstance(node, dict) and "code_scale" in node and "quant_weight" in node


def without_integer_codes(tree: Any) -> Any:
    """``tree`` (nested dicts / lists: arrays or shapes) less every WINT2 linear's ``code_a`` /
    ``code_b``; the other leaves are the same objects, not copies."""
    if isinstance(tree, list):
        return [without_integer_codes(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if is_wint2_linear(tree):
        return {k: v for k, v in tree.items() if k not in INTEGER_CODE_LEAVES}
    return {k: without_integer_codes(v) for k, v in tree.items()}


def match_integer_codes(shapes: Any, tree: Any) -> Any:
    """``shapes`` less ``code_a`` / ``code_b`` of each WINT2 linear that ``tree`` holds with
    neither of them (so a tree may store them or not, linear by linear, but not one alone)."""
    if isinstance(shapes, list):
        if not isinstance(tree, list | tuple) or len(tree) != len(shapes):
            return shapes
        return [match_integer_codes(s, t) for s, t in zip(shapes, tree, strict=True)]
    if not isinstance(shapes, dict) or not isinstance(tree, dict):
        return shapes
    if is_wint2_linear(shapes) and not any(leaf in tree for leaf in INTEGER_CODE_LEAVES):
        return without_integer_codes(shapes)
    return {k: match_integer_codes(v, tree[k]) if k in tree else v for k, v in shapes.items()}


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
