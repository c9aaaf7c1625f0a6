"""The key table: source tensor names -> runtime tree paths + hook, and the part builder.

One row per runtime ``<linear>`` or leaf, for the Paddle (``ernie.``, ``[in, out]``, fused
qkv / up_gate, quantized per ``quantization_config``) and HF (``model.``, torch ``[out, in]``,
separate q/k/v and gate/up) layouts (``shared/docs/ernie45-architecture.md``). ``{e}`` in a name
expands to every routed expert, and the results are stacked ``[E, ...]``.

:func:`build_part` turns one part (``embed``, ``layers/<i>``, ``final_norm``, ``lm_head``) of a
source checkpoint into runtime leaves, reading only that part's tensors. For a ``rank{r}/``
checkpoint it builds every rank's slice against that rank's expected shapes
(:func:`converters.tp.rank_shapes`) and merges them to TP1 (:func:`converters.tp.merge_tp`).
WINT2 linears then get the integer code step's ``code_a`` / ``code_b``, which no source holds,
fitted from their ``code_scale`` / ``code_zp`` (:func:`jaxwint2.checkpoint.add_integer_codes`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxwint2.checkpoint import add_integer_codes, check_part, layer_index, part_shapes
from jaxwint2.config import ErnieConfig

from . import hooks
from .errors import CheckpointError
from .reader import SourceCheckpoint
from .tp import merge_tp, rank_shapes

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Rule:
    """Runtime ``target`` (path under the part) <- source ``names`` (under the part's prefix)."""

    target: str
    names: tuple[str, ...]
    hook: str
    when: str = "always"  # "always" | "dense" | "moe" | "shared"


_NORMS = (
    Rule("input_norm/weight", ("input_layernorm.weight",), "norm"),
    Rule("post_attention_norm/weight", ("post_attention_layernorm.weight",), "norm"),
)
_MOE_ROUTER = "mlp.moe_statics.e_score_correction_bias"

PADDLE_LAYER = (
    *_NORMS,
    Rule("attn/qkv", ("self_attn.qkv_proj",), "paddle_linear"),
    Rule("attn/o", ("self_attn.o_proj",), "paddle_linear"),
    Rule("mlp/up_gate", ("mlp.up_gate_proj",), "paddle_linear", "dense"),
    Rule("mlp/down", ("mlp.down_proj",), "paddle_linear", "dense"),
    Rule("mlp/router/weight", ("mlp.gate.weight",), "router_in_out", "moe"),
    Rule("mlp/router/bias", (_MOE_ROUTER,), "correction_bias", "moe"),
    Rule("mlp/experts/up_gate", ("mlp.experts.{e}.up_gate_proj",), "paddle_linear", "moe"),
    Rule("mlp/experts/down", ("mlp.experts.{e}.down_proj",), "paddle_linear", "moe"),
    Rule("mlp/shared/up_gate", ("mlp.shared_experts.up_gate_proj",), "paddle_linear", "shared"),
    Rule("mlp/shared/down", ("mlp.shared_experts.down_proj",), "paddle_linear", "shared"),
)

HF_LAYER = (
    *_NORMS,
    Rule("attn/qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                      "self_attn.v_proj.weight"), "hf_linear"),
    Rule("attn/o", ("self_attn.o_proj.weight",), "hf_linear"),
    Rule("mlp/up_gate", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "hf_linear", "dense"),
    Rule("mlp/down", ("mlp.down_proj.weight",), "hf_linear", "dense"),
    Rule("mlp/router/weight", ("mlp.gate.weight",), "router_out_in", "moe"),
    Rule("mlp/router/bias", (_MOE_ROUTER,), "correction_bias", "moe"),
    Rule("mlp/experts/up_gate", ("mlp.experts.{e}.gate_proj.weight",
                                 "mlp.experts.{e}.up_proj.weight"), "hf_linear", "moe"),
    Rule("mlp/experts/down", ("mlp.experts.{e}.down_proj.weight",), "hf_linear", "moe"),
    Rule("mlp/shared/up_gate", ("mlp.shared_experts.gate_proj.weight",
                                "mlp.shared_experts.up_proj.weight"), "hf_linear", "shared"),
    Rule("mlp/shared/down", ("mlp.shared_experts.down_proj.weight",), "hf_linear", "shared"),
)

# top-level parts: (rule, whether the name takes the layout prefix)
TOP = {
    "embed": (Rule("weight", ("embed_tokens.weight",), "embedding"), True),
    "final_norm": (Rule("weight", ("norm.weight",), "norm"), True),
    "lm_head": (Rule("weight", ("lm_head.weight",), "lm_head"), False),
}
PREFIX = {"paddle": "ernie.", "hf": "model."}
SKIPPED_PREFIXES = ("mtp",)  # multi-token-prediction head: not used for generation


def _applies(rule: Rule, cfg: ErnieConfig, i: int) -> bool:
    moe = cfg.is_moe_layer(i)
    return {"always": True, "dense": not moe, "moe": moe,
            "shared": moe and cfg.moe_num_shared_experts > 0}[rule.when]


def _get(tree: Tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _put(tree: Tree, path: str, value) -> None:
    *head, last = path.split("/")
    for k in head:
        tree = tree.setdefault(k, {})
    tree[last] = value


def _widths(rule: Rule, cfg: ErnieConfig, n: int) -> tuple[int, ...]:
    if len(rule.names) == 3:
        return (cfg.q_size, cfg.kv_size, cfg.kv_size)
    if len(rule.names) == 2:  # gate, up (of a possibly TP-sliced [gate | up])
        return (n // 2, n // 2)
    return (n,)


def _apply(rule: Rule, fetch: hooks.Fetch, cfg: ErnieConfig, layout: str, prefix: str,
           shapes) -> Any:
    """Run one rule's hook for ``shapes`` (a leaf's ShapeDtypeStruct, or a linear's dict)."""
    names = tuple(prefix + n for n in rule.names)
    if rule.hook == "paddle_linear":
        if "{e}" in names[0]:
            return hooks.stack_experts(
                lambda e, s: hooks.paddle_linear(fetch, names[0].format(e=e), s), shapes)
        return hooks.paddle_linear(fetch, names[0], shapes)
    if rule.hook == "hf_linear":
        def one(e, s):
            n = s["weight"].shape[-1]
            return hooks.hf_linear(fetch, tuple(nm.format(e=e) for nm in names), s,
                                   _widths(rule, cfg, n))
        if "{e}" in names[0]:
            return hooks.stack_experts(one, shapes)
        return one(None, shapes)
    shape = tuple(shapes.shape)
    if rule.hook in ("router_in_out", "router_out_in"):
        return hooks.router(fetch, names[0], shape, out_in=rule.hook == "router_out_in")
    if rule.hook == "lm_head":
        return hooks.lm_head(fetch, names[0], shape, out_in=layout == "hf")
    return getattr(hooks, rule.hook)(fetch, names[0], shape)  # norm, embedding, correction_bias


def _origin(layout: str, quantized: bool) -> str:
    """Where the expected format comes from, for error messages."""
    return f"{layout} config.json {'quantization_config' if quantized else '(unquantized)'}"


def build_rank_part(ckpt: SourceCheckpoint, part: str, rank: int) -> tuple[Tree, hooks.Fetch]:
    """One rank's slice of ``part`` in runtime layout (shapes of that rank), from its source
    tensors only: WINT2 linears without ``code_a`` / ``code_b``."""
    cfg, tp = ckpt.config, ckpt.tp_size
    quantized = bool(ckpt.config_dict.get("quantization_config"))
    fetch = hooks.Fetch(ckpt.ranks[rank], _origin(ckpt.layout, quantized))
    shapes = (rank_shapes(cfg, part, rank, tp, integer_codes=False) if tp > 1
              else part_shapes(cfg, part, integer_codes=False))
    i = layer_index(part)
    out: Tree = {}
    if i is None:
        rule, prefixed = TOP[part]
        prefix = PREFIX[ckpt.layout] if prefixed else ""
        out["weight"] = _apply(rule, fetch, cfg, ckpt.layout, prefix, shapes["weight"])
        return out, fetch
    fetch.origin = f"{_origin(ckpt.layout, quantized)}, layer {i}"
    prefix = f"{PREFIX[ckpt.layout]}layers.{i}."
    for rule in PADDLE_LAYER if ckpt.layout == "paddle" else HF_LAYER:
        if _applies(rule, cfg, i):
            _put(out, rule.target, _apply(rule, fetch, cfg, ckpt.layout, prefix,
                                          _get(shapes, rule.target)))
    return out, fetch


def build_part(ckpt: SourceCheckpoint, part: str) -> tuple[Tree, list[hooks.Fetch]]:
    """``part`` of ``ckpt`` in TP1 runtime layout, checked against :mod:`jaxwint2.layout`
    (WINT2 ``code_a`` / ``code_b`` fitted after the ranks are merged, one part at a time).

    Returns the subtree and the per-rank :class:`hooks.Fetch` records (consumed names, rounded
    tensors).
    """
    try:
        built = [build_rank_part(ckpt, part, r) for r in range(ckpt.tp_size)]
        subtrees, fetches = [b[0] for b in built], [b[1] for b in built]
        sub = merge_tp(ckpt.config, part, subtrees) if ckpt.tp_size > 1 else subtrees[0]
        check_part(ckpt.config, part, sub, integer_codes=False)
        sub = add_integer_codes(sub)
    except CheckpointError:
        raise
    except ValueError as e:  # shapes that cannot be split, ranks that disagree
        raise CheckpointError(f"{ckpt.path}: {e}") from e
    return sub, fetches


def ignored_names(ckpt: SourceCheckpoint) -> set[str]:
    """Names read by no rule on purpose: ``mtp*`` and a tied model's stored ``lm_head.weight``."""
    every = set().union(*(r.keys() for r in ckpt.ranks))
    names = {n for n in every if n.startswith(SKIPPED_PREFIXES)
             or n.removeprefix(PREFIX[ckpt.layout]).startswith(SKIPPED_PREFIXES)}
    if ckpt.config.tie_word_embeddings and "lm_head.weight" in every:
        names.add("lm_head.weight")
    return names
