"""``ErnieForCausalLM``: the ERNIE-4.5 MoE causal LM in Flax NNX, and its compiled step.

Owns the whole-model forward (embedding -> layer stacks -> final norm -> head) and the two entry
points every caller uses:

* ``model(token_ids)``: a full causal forward, fp32 logits ``[B, T, V]`` (no cache);
* ``model.step(tokens, positions, block_tables, cache, logits_at=None)``: one prefill chunk or
  decode step over the paged KV cache (:mod:`jaxwint2.kv_cache`); ``model.step_jit`` is the same
  under ``jax.jit`` with the cache donated. The serving engine and :func:`jaxwint2.generate`
  both drive the model only through ``init_cache`` / ``step_jit``.

The model is built from a parameter tree in the runtime layout (``jaxwint2/layout.py``):
:meth:`ErnieForCausalLM.from_params` validates it, stacks each run of identically-shaped layers
(:func:`jaxwint2.decoder.layer_groups`) and wraps the leaves as NNX params; it never copies or
re-encodes quantized bytes. Reading checkpoints is :func:`jaxwint2.load`'s job, choosing blocks
and sampling are the callers'.

Example:
  >>> model = ErnieForCausalLM.from_params(cfg, params, kernels="reference", dtype="float32")
  >>> logits = model(jnp.array([[1, 2, 3]]))                    # fp32 [1, 3, V]
  >>> cache = model.init_cache(num_blocks=8, block_size=16)
  >>> last, cache = model.step_jit(tokens, positions, block_tables, cache,
  ...                              logits_at=lengths - 1)        # fp32 [B, V]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pallas_kernels

from . import kv_cache as kvc
from . import layout
from .config import ErnieConfig
from .decoder import LayerStack, layer_groups, stack_layers
from .formats import WeightFormat, implementation_for
from .layers import Embedding, Linear, LMHead, RMSNorm

try:  # public in jax 0.10 / 0.11; kept behind a fallback in case it moves
    from jax.core import Tracer as _Tracer
except ImportError:  # pragma: no cover
    from jax._src.core import Tracer as _Tracer

DTYPES = ("bfloat16", "float32")


def _check_dtype(dtype) -> str:
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return name


def _validated(cfg: ErnieConfig, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``params`` against ``layout.param_shapes(cfg)``; cast float leaves to their dtype.

    WINT2 linears may hold ``code_a`` / ``code_b`` or not (``layout.match_integer_codes``)."""
    if "layers" not in params:
        raise ValueError("params has no 'layers' entry (runtime layout: jaxwint2/layout.py)")
    expected = layout.match_integer_codes(layout.param_shapes(cfg), dict(params))
    got_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    want = jax.tree_util.tree_leaves_with_path(expected)
    missing = [jax.tree_util.keystr(p) for p, _ in want if jax.tree_util.keystr(p) not in got_paths]
    if missing:
        raise ValueError(f"params is missing {len(missing)} leaves for this config, e.g. "
                         f"params{missing[0]}")
    want_paths = {jax.tree_util.keystr(p) for p, _ in want}
    extra = sorted(got_paths - want_paths)
    if extra:
        raise ValueError(f"params has {len(extra)} leaves this config does not use, e.g. "
                         f"params{extra[0]}")

    def check(path, spec, leaf):
        name = f"params{jax.tree_util.keystr(path)}"
        if tuple(leaf.shape) != spec.shape:
            raise ValueError(f"{name} has shape {tuple(leaf.shape)}, expected {spec.shape}")
        if jnp.dtype(leaf.dtype) == spec.dtype:
            return leaf
        if jnp.issubdtype(spec.dtype, jnp.floating) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(spec.dtype)
        raise ValueError(f"{name} has dtype {jnp.dtype(leaf.dtype)}, expected {spec.dtype}")

    return jax.tree_util.tree_map_with_path(check, expected, dict(params))


class ErnieForCausalLM(nnx.Module):
    """ERNIE-4.5 MoE causal LM over quantized (bf16 / WINT8 / WINT4 / WINT2) weights.

    Args:
      cfg: the model's :class:`ErnieConfig`.
      params: runtime-layout tree (``jaxwint2/layout.py``); ``params["layers"]`` is the list of
        per-layer trees, or pass ``params["layer_stacks"]`` (one tree per
        :func:`layer_groups` run, leaves stacked on a leading axis) to skip stacking. On a
        Hopper GPU (bf16, kernels not ``"reference"``) WINT2 expert bytes are re-ordered for the
        Mosaic GPU kernel (:func:`pallas_kernels.to_fragments`): into a copy, or, with
        ``donate_stacks``, inside the given stacks (consumed; peak memory one layer instead of a
        second copy of the experts: what a 300B on one GPU needs). WINT2 ``code_a`` /
        ``code_b`` leaves, where given, go to that kernel (absent: it fits them); every other
        linear drops them (nothing else reads them).
      kernels: ``"pallas"`` | ``"reference"`` | ``"auto"`` (see :mod:`jaxwint2.formats`).
      dtype: activation / compute dtype, ``"bfloat16"`` or ``"float32"``.
      k_order: WINT2 in-group K order of the checkpoint (``meta["k_order"]``).
      axis_name: mesh axis for tensor parallelism under ``shard_map`` (sums after ``o`` and
        every FFN); ``None`` for one device.
      donate_stacks: the caller hands over ``params["layer_stacks"]`` (see ``params``).

    Example:
      >>> model = ErnieForCausalLM.from_params(ErnieConfig.tiny(), params)
      >>> logits = model(token_ids)  # fp32 [B, T, V]
    """

    def __init__(self, cfg: ErnieConfig, params: Mapping[str, Any], *, kernels: str = "auto",
                 dtype: str = "bfloat16", k_order: str = "natural",
                 axis_name: str | None = None, donate_stacks: bool = False):
        implementation_for(kernels)
        self.config = cfg
        self.kernels = kernels
        self.dtype = _check_dtype(dtype)
        self.k_order = k_order
        dense_fmt = WeightFormat(cfg.dense_format, kernels, k_order)
        groups = layer_groups(cfg)
        stacks = params.get("layer_stacks")
        in_place = donate_stacks or stacks is None  # stacks built here are ours to re-order
        if stacks is None:
            stacks = [stack_layers(params["layers"][g.start:g.stop]) for g in groups]
        if len(stacks) != len(groups):
            raise ValueError(f"params['layer_stacks'] has {len(stacks)} entries, expected "
                             f"{len(groups)} (one per layer_groups(cfg) run)")

        expert_fmts = []
        stacks = list(stacks)
        for i, (g, st) in enumerate(zip(groups, stacks, strict=True)):
            fmt = None
            stacks[i] = layout.without_integer_codes(st)  # read by the Mosaic kernel only
            if cfg.is_moe_layer(g.start):
                fmt = WeightFormat(cfg.expert_format(g.start), kernels, k_order)
                if self._use_fragments(fmt, st["mlp"]["experts"]):
                    fmt = dataclasses.replace(fmt, byte_order="fragments")
                    experts = {proj: pallas_kernels.to_fragments(w, in_place=in_place)
                               for proj, w in st["mlp"]["experts"].items()}
                    stacks[i] = {**stacks[i], "mlp": {**stacks[i]["mlp"], "experts": experts}}
            expert_fmts.append(fmt)

        self.embed = Embedding(params["embed"]["weight"], axis_name=axis_name)
        self.stacks = nnx.List([
            LayerStack(cfg, g, st, dense_fmt=dense_fmt, expert_fmt=fmt, axis_name=axis_name)
            for g, st, fmt in zip(groups, stacks, expert_fmts, strict=True)])
        self.final_norm = RMSNorm(params["final_norm"]["weight"], cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else LMHead(params["lm_head"]["weight"])
        self.axis_name = axis_name

    def _use_fragments(self, fmt: WeightFormat, experts: Mapping[str, Any]) -> bool:
        """WINT2 experts go to the Mosaic GPU kernel (fragment byte order) on a Hopper GPU.

        Also under tensor parallelism (each shard's own shapes and bytes) and for either K order
        of the checkpoint; not for fp32 activations or the reference kernels. Measured reason:
        ``pallas_kernels/results/NOTES.md`` §20-24 (the 300B expert FFN 1.2-2.1x the Triton
        kernel at 1-1024 tokens on an H100; decode 42.8 -> 55.9 tok/s on an H200).
        """
        return (fmt.name == "wint2" and fmt.kernels != "reference" and self.dtype == "bfloat16"
                and pallas_kernels.fragments_available()
                and all(pallas_kernels.fragments_support(w) for w in experts.values()))

    @classmethod
    def from_params(cls, cfg: ErnieConfig, params: Mapping[str, Any], **kw) -> ErnieForCausalLM:
        """Validate a per-layer runtime tree against ``cfg``, stack its layers and build."""
        if "layer_stacks" in params:
            return cls(cfg, params, **kw)
        return cls(cfg, _validated(cfg, params), **kw)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    # ------------------------------------------------------------------ forward

    def _run(self, tokens, positions, kv, logits_at):
        with jax.named_scope("embed"):
            x = self.embed(tokens, self.compute_dtype)  # [B, T, H]
        cache = None
        for stack in self.stacks:
            x, cache = stack(x, positions, kv)
            if kv is not None:
                kv = (cache, kv[1])
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)[:, 0]
        with jax.named_scope("lm_head"):
            x = self.final_norm(x)
            logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)
            if self.axis_name is not None:  # vocab-parallel head: this rank's columns -> all
                logits = jax.lax.all_gather(logits, self.axis_name, axis=-1, tiled=True)
        return logits, cache

    def forward(self, token_ids: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Full causal forward (traceable): int ``[B, T]`` -> fp32 logits ``[B, T, V]``."""
        token_ids = _int_array("token_ids", token_ids, ndim=2)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1], dtype=jnp.int32),
                                         token_ids.shape)
        logits, _ = self._run(token_ids, positions, None, None)
        return logits

    def __call__(self, token_ids, positions=None) -> jax.Array:
        """``model(token_ids)``: :meth:`forward`, compiled once per shape when called eagerly."""
        if isinstance(token_ids, _Tracer) or isinstance(positions, _Tracer):
            return self.forward(token_ids, positions)
        token_ids = _int_array("token_ids", token_ids, ndim=2)
        graphdef, state = nnx.split(self)
        return _forward_jit(graphdef)(state, token_ids, positions)

    # ------------------------------------------------------------------ paged step

    def init_cache(self, num_blocks: int, block_size: int) -> kvc.KVCache:
        """A zeroed paged KV cache ``[L, num_blocks, block_size, n_kv, head_dim]``."""
        cfg = self.config
        return kvc.KVCache.create(num_layers=cfg.num_hidden_layers, num_blocks=num_blocks,
                                  block_size=block_size, num_kv_heads=cfg.num_key_value_heads,
                                  head_dim=cfg.head_dim, dtype=self.compute_dtype)

    def step(self, tokens, positions, block_tables, cache: kvc.KVCache, *,
             logits_at=None) -> tuple[jax.Array, kvc.KVCache]:
        """One prefill chunk or decode step over the paged cache (traceable).

        Args:
          tokens: int32 ``[B, T]``.
          positions: int32 ``[B, T]`` absolute position of each token; ``-1`` = padding (not
            written; its logits are meaningless).
          block_tables: int32 ``[B, P]`` physical blocks of each row's sequence, in order.
          cache: the :class:`KVCache`; returned updated.
          logits_at: ``None`` -> logits for every token ``[B, T, V]``; int32 ``[B]`` -> only
            token ``logits_at[b]`` of each row, ``[B, V]``.

        Returns:
          ``(fp32 logits, cache)``.
        """
        tokens = _int_array("tokens", tokens, ndim=2)
        positions = _int_array("positions", positions, ndim=2)
        block_tables = _int_array("block_tables", block_tables, ndim=2)
        if positions.shape != tokens.shape:
            raise ValueError(f"positions has shape {positions.shape}, expected tokens' "
                             f"{tokens.shape}")
        if block_tables.shape[0] != tokens.shape[0]:
            raise ValueError(f"block_tables has {block_tables.shape[0]} rows, expected "
                             f"{tokens.shape[0]} (one per row of tokens)")
        if logits_at is not None:
            logits_at = _int_array("logits_at", logits_at, ndim=1)
            if logits_at.shape[0] != tokens.shape[0]:
                raise ValueError(f"logits_at has shape {logits_at.shape}, expected "
                                 f"({tokens.shape[0]},)")
        if cache.num_layers != self.config.num_hidden_layers:
            raise ValueError(f"cache has {cache.num_layers} layers, the model "
                             f"{self.config.num_hidden_layers}")
        batch = kvc.paged_batch(positions, block_tables, cache)
        return self._run(tokens, positions, (cache, batch), logits_at)

    @property
    def step_jit(self):
        """:meth:`step` under ``jax.jit``, the cache donated. Bucket ``B, T, P`` in the caller."""
        graphdef, state = nnx.split(self)
        fn = _step_jit(graphdef)

        def step_jit(tokens, positions, block_tables, cache, *, logits_at=None):
            return fn(state, tokens, positions, block_tables, cache, logits_at)

        return step_jit


def _int_array(name: str, x, *, ndim: int) -> jax.Array:
    if not isinstance(x, jax.Array | np.ndarray):
        x = np.asarray(x)
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.astype(jnp.int32) if x.dtype != jnp.int32 else x


@functools.lru_cache(maxsize=32)
def _forward_jit(graphdef):
    @jax.jit
    def forward(state, token_ids, positions):
        return nnx.merge(graphdef, state).forward(token_ids, positions)

    return forward


@functools.lru_cache(maxsize=32)
def _step_jit(graphdef):
    def step(state, tokens, positions, block_tables, cache, logits_at):
        return nnx.merge(graphdef, state).step(tokens, positions, block_tables, cache,
                                               logits_at=logits_at)

    return jax.jit(step, donate_argnums=(4,))


def count_params(model: ErnieForCausalLM) -> int:
    """Logical weights of a (possibly abstract) model: a packed linear counts its ``E*K*N``."""
    per_byte = {"bf16": 1, "wint8": 1, "wint4": 2, "wint2": 4}
    total = 0
    counted: set[int] = set()
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            main = getattr(node, "weight" if "weight" in node.leaf_names else "quant_weight")
            total += int(np.prod(main.get_value().shape)) * per_byte[node.fmt.name]
            counted.update(id(getattr(node, n)) for n in node.leaf_names)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param) and id(node) not in counted:
            total += int(np.prod(node.get_value().shape))
    return total
