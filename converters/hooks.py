"""One-purpose tensor transforms from source tensors to runtime-layout leaves.

Each hook reads the source tensors it is given through a :class:`Fetch` (which checks name,
dtype and shape *before* reading data, and names file and tensor in every error) and returns
leaves of the runtime layout (:mod:`jaxwint2.layout`) for the expected shapes it is given:

* Paddle linears: ``bf16`` kept; WINT8 ``weight_quantize`` placement undone
  (:func:`converters.weight_only.unpack_weight_only`); WINT4 placement undone and re-packed to the
  runtime ``[K/2, N]`` nibble layout; WINT2 tensors kept byte for byte (``super_scales`` widened
  exactly to f32).
* HF linears: torch ``[out, in]`` pieces concatenated on ``out`` (q/k/v, gate/up) and transposed.
* norms, router (``[H, E]`` or ``[E, H]``), correction bias ``[1, E]``, embedding, lm_head.

The key table (:mod:`converters.keymap`) says which hook builds which leaf from which names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jaxwint2.layout import linear_format

from .errors import CheckpointError
from .reader import TensorSource
from .safetensors_io import as_float
from .weight_only import unpack_weight_only

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = ("BF16", "U16", "F16", "F32")
Shapes = dict[str, jax.ShapeDtypeStruct]


class Fetch:
    """Checked, recorded reads from one :class:`TensorSource`.

    ``consumed`` collects every name read (for the unknown-tensor warning); ``rounded`` the
    tensors whose values had to be rounded to reach the runtime dtype (f32 -> bf16).
    """

    def __init__(self, src: TensorSource, origin: str):
        self.src = src
        self.origin = origin  # e.g. "config.json says wint2 for layers/5", used in messages
        self.consumed: set[str] = set()
        self.rounded: list[str] = []

    def has(self, name: str) -> bool:
        return name in self.src

    def __call__(self, name: str, dtypes: tuple[str, ...],
                 shape: tuple[int, ...] | list[tuple[int, ...]], *, why: str = "") -> np.ndarray:
        """Read ``name`` after checking its declared dtype and shape (or one of ``shape``s)."""
        if name not in self.src:
            raise CheckpointError(f"{self.src.path}: missing tensor {name!r}"
                                  f"{f' ({why})' if why else ''}")
        info = self.src.info(name)
        shapes = [tuple(s) for s in shape] if isinstance(shape, list) else [tuple(shape)]
        if info.dtype not in dtypes or tuple(info.shape) not in shapes:
            want = f"{'/'.join(dtypes)} {' or '.join(str(list(s)) for s in shapes)}"
            raise CheckpointError(f"{self.src.where(name)} is {info.dtype} {list(info.shape)}, "
                                  f"expected {want}{f' ({why})' if why else ''}")
        self.consumed.add(name)
        return self.src.read(name)

    def to_bf16(self, name: str, x: np.ndarray) -> np.ndarray:
        x = as_float(x, what=self.src.where(name))
        if x.dtype == BF16:
            return x
        y = x.astype(BF16)
        if not np.array_equal(y.astype(x.dtype), x):
            self.rounded.append(name)
        return y

    def to_f32(self, name: str, x: np.ndarray) -> np.ndarray:
        return as_float(x, what=self.src.where(name)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Paddle linears ([in, out], quantized per config)
# --------------------------------------------------------------------------------------------


def paddle_linear(fetch: Fetch, prefix: str, shapes: Shapes) -> dict[str, np.ndarray]:
    """``{prefix}.weight`` or ``{prefix}.quant_weight`` + scales -> one runtime ``<linear>``."""
    fmt = linear_format(shapes)
    why = f"{fmt} per {fetch.origin}"
    if fmt == "bf16":
        if fetch.has(f"{prefix}.quant_weight"):
            raise CheckpointError(f"{fetch.src.where(prefix + '.quant_weight')} is quantized but "
                                  f"{fetch.origin} expects an unquantized {prefix}.weight")
        k, n = shapes["weight"].shape
        w = fetch(f"{prefix}.weight", FLOATS, (k, n), why=why)
        return {"weight": fetch.to_bf16(f"{prefix}.weight", w)}
    if not fetch.has(f"{prefix}.quant_weight") and fetch.has(f"{prefix}.weight"):
        raise CheckpointError(f"{fetch.src.where(prefix + '.weight')} is unquantized but "
                              f"{fetch.origin} expects {fmt} ({prefix}.quant_weight)")
    n = shapes["quant_weight"].shape[-1]
    if fmt in ("wint8", "wint4"):
        k = shapes["quant_weight"].shape[0] * (1 if fmt == "wint8" else 2)
        bits = 8 if fmt == "wint8" else 4
        qw = fetch(f"{prefix}.quant_weight", ("I8",), (n * bits // 8, k), why=why)
        ws = fetch(f"{prefix}.weight_scale", FLOATS, (n,), why=why)
        q = unpack_weight_only(qw, bits=bits)  # [K, N] plain integers
        if fmt == "wint4":
            u = (q.astype(np.int16) + 8).astype(np.uint8)
            q = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)  # row 2i low nibble, 2i+1 high
        return {"quant_weight": q, "weight_scale": fetch.to_bf16(f"{prefix}.weight_scale", ws)}
    if fmt == "wint2":
        return {
            "quant_weight": fetch(f"{prefix}.quant_weight", ("U8",),
                                  shapes["quant_weight"].shape, why=why),
            "weight_scale": fetch(f"{prefix}.weight_scale", ("U8",),
                                  shapes["weight_scale"].shape, why=why),
            "super_scales": fetch.to_f32(f"{prefix}.super_scales", fetch(
                f"{prefix}.super_scales", ("BF16", "U16", "F32"), (n,), why=why)),
            "code_scale": fetch(f"{prefix}.code_scale", ("F32",), (n,), why=why),
            "code_zp": fetch(f"{prefix}.code_zp", ("F32",), (n,), why=why),
        }
    raise CheckpointError(f"{prefix}: unsupported weight format {fmt!r}")


# --------------------------------------------------------------------------------------------
# HF linears (torch [out, in], unquantized)
# --------------------------------------------------------------------------------------------


def hf_linear(fetch: Fetch, names: tuple[str, ...], shapes: Shapes,
              widths: tuple[int, ...]) -> dict[str, np.ndarray]:
    """``[out_i, in]`` pieces (q/k/v or gate/up, in order) -> ``weight [in, sum(out_i)]`` bf16."""
    if linear_format(shapes) != "bf16":
        raise CheckpointError(f"{fetch.src.path}: HF checkpoints are unquantized, but "
                              f"{fetch.origin} asks for {linear_format(shapes)}")
    k, _ = shapes["weight"].shape
    pieces = [fetch.to_bf16(nm, fetch(nm, FLOATS, (w, k), why=fetch.origin))
              for nm, w in zip(names, widths, strict=True)]
    return {"weight": np.ascontiguousarray(np.concatenate(pieces, axis=0).T)}


# --------------------------------------------------------------------------------------------
# small leaves
# --------------------------------------------------------------------------------------------


def norm(fetch: Fetch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return fetch.to_f32(name, fetch(name, FLOATS, shape, why=fetch.origin))


def embedding(fetch: Fetch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    return fetch.to_bf16(name, fetch(name, FLOATS, shape, why=fetch.origin))


def router(fetch: Fetch, name: str, shape: tuple[int, ...], *, out_in: bool) -> np.ndarray:
    """Router weight to f32 ``[H, E]`` from Paddle ``[H, E]`` or HF ``[E, H]``."""
    h, e = shape
    w = fetch.to_f32(name, fetch(name, FLOATS, (e, h) if out_in else (h, e), why=fetch.origin))
    return np.ascontiguousarray(w.T) if out_in else w


def correction_bias(fetch: Fetch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``e_score_correction_bias`` ``[1, E]`` (or ``[E]``) -> f32 ``[E]``; never via bf16."""
    (e,) = shape
    return fetch.to_f32(name, fetch(name, FLOATS, [(1, e), (e,)], why=fetch.origin)).reshape(e)


def lm_head(fetch: Fetch, name: str, shape: tuple[int, ...], *, out_in: bool) -> np.ndarray:
    """lm_head to bf16 ``[H, V]``: HF stores ``[V, H]``; Paddle either (decided by shape)."""
    h, v = shape
    allowed = [(v, h)] if out_in else [(h, v), (v, h)]  # FastDeploy reads a Paddle [V, H] too
    w = fetch.to_bf16(name, fetch(name, FLOATS, allowed, why=fetch.origin))
    return np.ascontiguousarray(w.T) if w.shape == (v, h) and (out_in or v != h) else w


def stack_experts(build: Callable[[int, Shapes], dict[str, np.ndarray]],
                  shapes: Shapes) -> dict[str, np.ndarray]:
    """Build expert ``e``'s leaves with ``build(e, per_expert_shapes)`` into ``[E, ...]`` arrays
    allocated once (no per-expert list, no second copy)."""
    n_exp = next(iter(shapes.values())).shape[0]
    per = {k: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for k, s in shapes.items()}
    out: dict[str, Any] = {k: np.empty(s.shape, s.dtype) for k, s in shapes.items()}
    for e in range(n_exp):
        for k, v in build(e, per).items():
            out[k][e] = v
    return out
