"""Tensor parallelism: the ``tp`` mesh, per-leaf PartitionSpecs, sharded params, :class:`TPModel`.

FastDeploy's split (``shared/docs/ernie45-architecture.md``, last section) applied to the runtime
tree, run with ``jax.shard_map`` over a 1-D mesh axis ``"tp"``:

* attention heads split (kv heads replicated when ``n_kv < tp``), each expert's intermediate
  dimension split, dense MLP and shared experts split, router / correction bias / norms
  replicated, vocab-parallel embedding and lm_head; one all-reduce after ``o`` and one after each
  FFN (inserted by the model's layers when built with ``axis_name``).
* Rank ``r``'s slice of every part is :func:`converters.split_tp`'s (WINT2 K slices keep whole
  64-row groups and re-pack their nibbles). A sharded leaf's *global* array is the concatenation
  of the rank slices along its split axis (:func:`leaf_spec`), so ``shard_map`` hands each rank
  exactly its slice. That global array is not the TP1 tensor where slices are re-packed (WINT2
  group scales) or duplicated (replicated kv heads): it is only ever used under ``shard_map``.
* Inside ``shard_map`` each rank runs a plain :class:`~jaxwint2.model.ErnieForCausalLM` built on
  :func:`local_config` (the per-rank head counts and widths) with ``axis_name="tp"``.

Multi-host: call ``jax.distributed.initialize()`` first; :func:`make_mesh` then spans every
process's devices, each process reads the checkpoint and places only its own ranks' slices
(``jax.make_array_from_single_device_arrays``), and all processes drive the same steps (SPMD).

This module knows the runtime tree's linear kinds (``jaxwint2/layout.py``) but not files (the
loader streams parts in), bit layouts, or how ranks are split byte by byte (``converters.tp``).

Example:
  >>> model = jaxwint2.parallel.load_tensor_parallel("ernie-21b-wint2", 2)  # doctest: +SKIP
  >>> cache = model.init_cache(num_blocks=64, block_size=16)                # sharded on kv heads
  >>> logits, cache = model.step_jit(tokens, positions, block_tables, cache, logits_at=last)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import checkpoint
from . import kv_cache as kvc
from .config import ErnieConfig
from .decoder import layer_groups
from .layout import flatten as _flatten
from .layout import linear_format
from .layout import unflatten as _unflatten
from .model import ErnieForCausalLM, _Tracer

AXIS = "tp"
Tree = dict[str, Any]

# The replication check is off: the vocab all-gather's result is replicated, but ``all_gather``
# is typed as varying over the axis (``all_gather_invariant`` is not in every jax we support).
if hasattr(jax, "shard_map"):  # jax >= 0.7 (0.10.2 on CI, 0.11.2 on the GPU machine)
    def _shard_map(f, mesh, in_specs, out_specs):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
else:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _experimental_shard_map

    def _shard_map(f, mesh, in_specs, out_specs):
        return _experimental_shard_map(f, mesh, in_specs, out_specs, check_rep=False)


# --------------------------------------------------------------------------------------------
# mesh and per-rank shapes
# --------------------------------------------------------------------------------------------


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A 1-D ``("tp",)`` mesh over the first ``tensor_parallel_size`` devices (global devices
    under ``jax.distributed``, where it must span all of them)."""
    devices = list(jax.devices() if devices is None else devices)
    tp = int(tensor_parallel_size)
    if tp < 1 or tp > len(devices):
        raise ValueError(f"tensor_parallel_size={tp} needs 1..{len(devices)} devices "
                         f"({len(devices)} available)")
    if jax.process_count() > 1 and tp != jax.device_count():
        raise ValueError(f"with {jax.process_count()} processes the tp mesh must span all "
                         f"{jax.device_count()} devices, got tensor_parallel_size={tp}")
    return Mesh(np.asarray(devices[:tp]), (AXIS,))


def local_config(cfg: ErnieConfig, tp: int) -> ErnieConfig:
    """The config one rank's slice satisfies: heads, widths and vocab divided by ``tp``.

    With fewer kv heads than ranks every rank holds one (replicated) kv head. Raises
    ``ValueError`` naming the dimension when the model does not split into ``tp`` ranks.
    """
    check_tensor_parallel(cfg, tp)
    return _local_config(cfg, tp)


def _local_config(cfg: ErnieConfig, tp: int) -> ErnieConfig:
    return cfg.replace(num_attention_heads=cfg.num_attention_heads // tp,
                       num_key_value_heads=max(cfg.num_key_value_heads // tp, 1),
                       intermediate_size=cfg.intermediate_size // tp,
                       moe_intermediate_size=cfg.moe_intermediate_size // tp,
                       vocab_size=cfg.vocab_size // tp)


@functools.lru_cache(maxsize=64)
def check_tensor_parallel(cfg: ErnieConfig, tp: int) -> None:
    """Raise ``ValueError`` unless every part of ``cfg`` splits into ``tp`` ranks.

    The rank shapes come from FastDeploy's split (:func:`converters.rank_shapes`) and must equal
    :func:`local_config`'s layout, so the model built per rank sees exactly its slice.
    """
    from converters.tp import rank_shapes  # lazy: converters imports jaxwint2

    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if cfg.moe_num_experts and cfg.moe_intermediate_size % tp:
        raise ValueError(f"moe_intermediate_size={cfg.moe_intermediate_size} does not split "
                         f"into {tp} ranks")
    loc = _local_config(cfg, tp)
    for part in checkpoint.part_names(cfg):
        got = rank_shapes(cfg, part, 0, tp)  # raises, naming the tensor, if indivisible
        checkpoint.check_part(loc, part, got)


# --------------------------------------------------------------------------------------------
# per-leaf partition specs
# --------------------------------------------------------------------------------------------


def _axis_spec(ndim: int, axis: int | None) -> P:
    if axis is None:
        return P()
    spec = [None] * ndim
    spec[axis] = AXIS
    return P(*spec)


def leaf_spec(part: str, path: tuple[str, ...], ndim: int, linear: Tree | None = None) -> P:
    """PartitionSpec of one runtime leaf (``path`` inside ``part``; ``linear`` = its
    ``<linear>`` dict when it belongs to one).

    * ``embed`` rows (vocab), ``lm_head`` columns (vocab);
    * ``qkv`` and every ``up_gate``: all leaves on the last (column) axis;
    * ``o`` and every ``down``: the weight rows (K) and, for WINT2, the group-scale rows;
      per-column leaves (scales, WINT2 ``code_a`` / ``code_b``) are replicated;
    * norms and the router: replicated.
    """
    if part == "embed":
        return _axis_spec(ndim, 0)
    if part == "lm_head":
        return _axis_spec(ndim, ndim - 1)
    if linear is None:
        return P()
    kind, leaf = path[-2], path[-1]
    if kind in ("qkv", "up_gate"):
        return _axis_spec(ndim, ndim - 1)
    if kind in ("o", "down"):
        rows = leaf in ("weight", "quant_weight") or (
            leaf == "weight_scale" and linear_format(linear) == "wint2")
        return _axis_spec(ndim, ndim - 2 if rows else None)
    raise ValueError(f"{part}/{'/'.join(path)}: no tensor-parallel rule for this leaf")


def part_specs(part: str, subtree: Tree) -> Tree:
    """:func:`leaf_spec` of every leaf of one part (same structure as ``subtree``)."""

    def visit(node: Tree, path: tuple[str, ...]) -> Tree:
        is_linear = all(not isinstance(v, dict) for v in node.values()) and any(
            k in node and len(node[k].shape) >= 2 for k in ("weight", "quant_weight")) \
            and path[-1:] != ("router",)
        return {k: (visit(v, (*path, k)) if isinstance(v, dict) else
                    leaf_spec(part, (*path, k), len(v.shape), node if is_linear else None))
                for k, v in node.items()}

    return visit(subtree, ())


def _global_shape(shape: tuple[int, ...], spec: P, tp: int) -> tuple[int, ...]:
    return tuple(d * tp if i < len(spec) and spec[i] == AXIS else d for i, d in enumerate(shape))


# --------------------------------------------------------------------------------------------
# sharding the runtime tree
# --------------------------------------------------------------------------------------------


def _global(mesh: Mesh, spec: P, shards: list[jax.Array]) -> jax.Array:
    shape = _global_shape(tuple(shards[0].shape), spec, mesh.size)
    return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, spec), shards)


class _RunBuffer:
    """The stacked leaves of one run of layers, filled one layer at a time in place.

    Allocated sharded (``P(None, *leaf_spec)``) when the run's first layer arrives; each layer
    is written with a donated ``dynamic_update_slice``, so device memory peaks at the stacked
    run plus one layer (not twice the run, as stacking a list would).
    """

    def __init__(self, mesh: Mesh, spec: dict, layer: dict, n: int):
        key = tuple((p, spec[p], layer[p].shape, layer[p].dtype.name) for p in spec)
        alloc, self._insert = _run_programs(mesh, key, n)
        self.leaves = alloc()
        self.filled: set[int] = set()
        self.n = n

    def insert(self, index: int, layer: dict) -> None:
        self.leaves = self._insert(self.leaves, layer, np.int32(index))
        self.filled.add(index)


@functools.lru_cache(maxsize=64)
def _run_programs(mesh: Mesh, key: tuple, n: int) -> tuple[Callable, Callable]:
    out = {p: NamedSharding(mesh, P(None, *spec)) for p, spec, _, _ in key}
    alloc = jax.jit(lambda: {p: jnp.zeros((n, *shape), dtype) for p, _, shape, dtype in key},
                    out_shardings=out)
    insert = jax.jit(lambda st, lay, i: {p: jax.lax.dynamic_update_index_in_dim(
        st[p], lay[p], i, 0) for p in out}, donate_argnums=(0,), out_shardings=out)
    return alloc, insert


def shard_params(cfg: ErnieConfig, parts: Iterable[tuple[str, Tree]], mesh: Mesh) -> Tree:
    """TP1 runtime parts -> a tree of global sharded arrays, layers stacked per group.

    Args:
      cfg: the (TP1) model config.
      parts: ``(part, subtree)`` pairs with host NumPy leaves in the runtime layout, in
        :func:`jaxwint2.checkpoint.part_names` order (``converters.iter_checkpoint`` yields
        them; one part is held on the host at a time).
      mesh: a ``("tp",)`` mesh (:func:`make_mesh`).

    Returns:
      ``{"embed", "layer_stacks", "final_norm"[, "lm_head"]}``: every leaf a ``jax.Array`` with
      a ``NamedSharding`` (:func:`leaf_spec`; stacks get a leading unsharded layer axis) whose
      shard on rank ``r`` is ``converters.split_tp(cfg, part, subtree, r, tp)``'s leaf. This
      process only builds the shards of its own devices.
    """
    from converters.tp import split_tp  # lazy: converters imports jaxwint2

    tp = mesh.size
    loc = local_config(cfg, tp)
    mine = [(r, d) for r, d in enumerate(mesh.devices.flat)
            if d.process_index == jax.process_index()]
    groups = layer_groups(cfg)
    group_of = {i: g for g in groups for i in g}
    out: Tree = {"layer_stacks": [None] * len(groups)}
    runs: dict[range, _RunBuffer] = {}

    for part, sub in parts:
        slices = {}
        for r, _ in mine:
            s = split_tp(cfg, part, sub, r, tp) if tp > 1 else sub
            checkpoint.check_part(loc, part, s)
            slices[r] = dict(_flatten(s))
        spec = dict(_flatten(part_specs(part, sub)))
        shards = {p: [jax.device_put(slices[r][p], d) for r, d in mine] for p in spec}
        del slices, sub
        i = checkpoint.layer_index(part)
        if i is None:
            out[part] = _unflatten({p: _global(mesh, spec[p], shards[p]) for p in spec})
            continue
        g = group_of[i]
        layer = {p: _global(mesh, spec[p], shards[p]) for p in spec}
        if g not in runs:
            runs[g] = _RunBuffer(mesh, spec, layer, len(g))
        runs[g].insert(i - g.start, layer)
        del layer, shards
    missing = [p for p in checkpoint.part_names(cfg)
               if checkpoint.layer_index(p) is None and p not in out]
    missing += [f"layers/{i}" for g in groups for i in g
                if g not in runs or i - g.start not in runs[g].filled]
    if missing:
        raise ValueError(f"parts missing from the checkpoint stream: {missing[:5]}")
    out["layer_stacks"] = [_unflatten(runs[g].leaves) for g in groups]
    return out


# --------------------------------------------------------------------------------------------
# the model under shard_map
# --------------------------------------------------------------------------------------------


class TPModel(nnx.Module):
    """:class:`~jaxwint2.model.ErnieForCausalLM` over a ``("tp",)`` mesh, same API.

    ``model(token_ids)``, ``step``, ``step_jit`` and ``init_cache`` behave exactly as on the TP1
    model, and like it this is an NNX module (``nnx.split`` / ``nnx.merge`` inside a caller's
    jit work, as :func:`jaxwint2.generate` does). Logits come back replicated (all-gathered over
    the vocab); the KV cache is sharded over kv heads (``[L, blocks, block_size,
    tp * n_kv_local, d]``: with ``n_kv < tp`` each rank stores its replicated head). Partial
    sums are all-reduced in fp32 and rounded once, so bf16 results differ from TP1 only by
    summation order.

    Args:
      cfg: the TP1 model config.
      params: the output of :func:`shard_params` on ``mesh``.
      mesh: the ``("tp",)`` mesh.
      kernels, dtype, k_order, donate_stacks: as for :class:`~jaxwint2.model.ErnieForCausalLM`.

    Example:
      >>> mesh = make_mesh(4)
      >>> model = TPModel(cfg, shard_params(cfg, parts, mesh), mesh, kernels="reference")
      >>> logits = model(jnp.array([[1, 2, 3]]))  # fp32 [1, 3, V], replicated
    """

    def __init__(self, cfg: ErnieConfig, params: Tree, mesh: Mesh, *, kernels: str = "auto",
                 dtype: str = "bfloat16", k_order: str = "natural", collectives: bool = True,
                 donate_stacks: bool = False):
        self.config = cfg
        self.mesh = mesh
        self.tensor_parallel_size = mesh.size
        self.local_config = local_config(cfg, mesh.size)
        # collectives=False drops every psum / all-gather: wrong numbers, same local work; only
        # the benchmark uses it, to measure the collectives' share of a step.
        self.module = ErnieForCausalLM(self.local_config, params, kernels=kernels, dtype=dtype,
                                       k_order=k_order, axis_name=AXIS if collectives else None,
                                       donate_stacks=donate_stacks)
        graphdef, state = nnx.split(self.module)
        specs = jax.tree.map(
            lambda a: a.sharding.spec if isinstance(a.sharding, NamedSharding) else P(), state)
        leaves, treedef = jax.tree.flatten(specs)
        self._programs = _programs(graphdef, mesh, tuple(leaves), treedef, collectives)

    @property
    def _state(self):
        """The inner model's params: global arrays (or their tracers when this TPModel runs
        inside a caller's jit after ``nnx.split`` / ``nnx.merge``, as in ``generate``)."""
        return nnx.split(self.module)[1]

    @property
    def compute_dtype(self) -> jnp.dtype:
        return self.module.compute_dtype

    @property
    def dtype(self) -> str:
        return self.module.dtype

    def forward(self, token_ids, positions=None) -> jax.Array:
        """Full causal forward (traceable): int ``[B, T]`` -> fp32 logits ``[B, T, V]``."""
        token_ids, = _ints(token_ids)
        return self._programs.forward(self._state, token_ids,
                                      None if positions is None else _ints(positions)[0])

    def __call__(self, token_ids, positions=None) -> jax.Array:
        """``model(token_ids)``: :meth:`forward`, compiled once per shape."""
        if isinstance(token_ids, _Tracer) or isinstance(positions, _Tracer):
            return self.forward(token_ids, positions)
        return self._programs.forward_jit(self._state, *_ints(token_ids),
                                          None if positions is None else _ints(positions)[0])

    def init_cache(self, num_blocks: int, block_size: int) -> kvc.KVCache:
        """A zeroed paged KV cache, sharded over kv heads (see the class docstring)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, "
                             f"{block_size}")
        loc = self.local_config
        shape = (loc.num_hidden_layers, num_blocks, block_size,
                 loc.num_key_value_heads * self.tensor_parallel_size, loc.head_dim)
        zeros = jax.jit(lambda: jnp.zeros(shape, kvc.storage_dtype(self.compute_dtype)),
                        out_shardings=NamedSharding(self.mesh, _CACHE_SPEC.k))
        return kvc.KVCache(k=zeros(), v=zeros())

    def step(self, tokens, positions, block_tables, cache: kvc.KVCache, *,
             logits_at=None) -> tuple[jax.Array, kvc.KVCache]:
        """One prefill chunk or decode step over the paged cache (traceable); see
        :meth:`jaxwint2.model.ErnieForCausalLM.step` (same arguments, same results)."""
        return self._programs.step(self._state, *_ints(tokens, positions, block_tables), cache,
                                   None if logits_at is None else _ints(logits_at)[0])

    @property
    def step_jit(self):
        """:meth:`step` under ``jax.jit``, the cache donated. Bucket ``B, T, P`` in the caller."""
        state, fn = self._state, self._programs.step_jit

        def step_jit(tokens, positions, block_tables, cache, *, logits_at=None):
            return fn(state, *_ints(tokens, positions, block_tables), cache,
                      None if logits_at is None else _ints(logits_at)[0])

        return step_jit


_CACHE_SPEC = kvc.KVCache(k=P(None, None, None, AXIS, None), v=P(None, None, None, AXIS, None))


class _Programs(NamedTuple):
    forward: Callable
    forward_jit: Callable
    step: Callable
    step_jit: Callable


@functools.lru_cache(maxsize=32)
def _programs(graphdef, mesh: Mesh, spec_leaves: tuple, spec_treedef,
              collectives: bool) -> _Programs:
    """The shard_mapped forward and step of one model structure on one mesh, and their jits.

    Cached, like :func:`jaxwint2.model._step_jit`, so that models of the same structure (e.g.
    re-loaded weights) share their compilations.
    """
    state_specs = jax.tree.unflatten(spec_treedef, spec_leaves)

    def vocab(ndim: int) -> P:  # logits: replicated, or this rank's vocab columns
        return P() if collectives else _axis_spec(ndim, ndim - 1)

    def forward(state, token_ids, positions):
        def body(state, token_ids, positions):
            return nnx.merge(graphdef, state).forward(token_ids, positions)

        return _shard_map(body, mesh, (state_specs, P(), P()), vocab(3))(
            state, token_ids, positions)

    def step(state, tokens, positions, block_tables, cache, logits_at):
        def body(state, tokens, positions, block_tables, cache, logits_at):
            return nnx.merge(graphdef, state).step(tokens, positions, block_tables, cache,
                                                   logits_at=logits_at)

        out_logits = vocab(3 if logits_at is None else 2)
        return _shard_map(body, mesh, (state_specs, P(), P(), P(), _CACHE_SPEC, P()),
                          (out_logits, _CACHE_SPEC))(
            state, tokens, positions, block_tables, cache, logits_at)

    return _Programs(forward, jax.jit(forward), step, jax.jit(step, donate_argnums=(4,)))


def _ints(*xs) -> list:
    out = []
    for x in xs:
        x = x if isinstance(x, jax.Array | np.ndarray) else np.asarray(x)
        out.append(x.astype(np.int32) if x.dtype != np.int32 else x)
    return out


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_tensor_parallel(path: str | os.PathLike, tensor_parallel_size: int, *,
                         kernels: str = "auto", dtype: str = "bfloat16",
                         k_order: str | None = None, devices=None) -> TPModel:
    """Load a checkpoint split ``tensor_parallel_size`` ways: :func:`jaxwint2.load`'s TP path.

    ``path`` is a converted jaxwint2 directory, a TP1 Paddle / HF source, or a FastDeploy
    pre-sharded ``rank0/ .. rank{n-1}/`` release of any ``n``: the reader merges its ranks
    part by part (re-packing WINT2 group scales), and :func:`shard_params` re-splits each part
    for this mesh, so any size that divides the model works, including FastDeploy's own ``n``
    and TP1 checkpoints that FastDeploy cannot split (its issue #2678).
    """
    from converters import iter_checkpoint  # lazy: converters imports jaxwint2

    mesh = make_mesh(tensor_parallel_size, devices)
    cfg, meta, parts = iter_checkpoint(path, k_order=k_order)
    local_config(cfg, mesh.size)  # fail before reading any tensor
    params = shard_params(cfg, parts, mesh)
    return TPModel(cfg, params, mesh, kernels=kernels, dtype=dtype,
                   k_order=meta.get("k_order", "natural"), donate_stacks=True)
