"""Quantize a bf16 ERNIE-4.5 MoE checkpoint into FastDeploy's w4w2 Paddle checkpoint.

Owns the per-linear choice of quantizer and the streaming loop: read one part of the source
(:func:`converters.iter_checkpoint`, Paddle or HF layout), quantize its linears into the runtime
layout of ``cfg.replace(quant=QuantConfig(dense="wint8", moe="wint2", w4_end_layer=...))``
(:func:`jaxwint2.layout.layer_shapes`), hand it to :func:`converters.write_paddle_checkpoint`,
which writes FastDeploy's exact names, dtypes and ``weight_quantize`` byte placement, drop it.

* WINT8 (attention, dense MLP, shared experts) and WINT4 (experts of MoE layers up to
  ``w4_end_layer``): symmetric per-column round-to-nearest, the scale the best of a few clipped
  absmax fractions (the layout of Paddle's ``weight_quantize``, which uses the plain absmax).
* WINT2 (experts of later MoE layers): :func:`converters.encode_wint2`, optionally with a
  calibration Hessian per linear (GPTQ-style error feedback). :func:`quantize_part` returns the
  full runtime layout, ``code_a``/``code_b`` included (the encoder's dyadic columns: closed
  form); the Paddle writer drops them, as FastDeploy's format has no such tensors.

The output is built in a temporary sibling directory and renamed into place at the end, so an
interrupted or failed run leaves nothing at ``dst``. It does not know tensor names (the key table
and the Paddle writer do) nor the WINT2 search (the encoder does).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxwint2 import checkpoint
from jaxwint2.config import ErnieConfig, QuantConfig
from jaxwint2.layout import linear_format
from pallas_kernels.reference import dequantize

from .convert import AUX_FILES, replace_dir
from .encode_wint2 import EFFORT, encode_wint2
from .errors import CheckpointError
from .loader import iter_checkpoint
from .paddle_writer import write_paddle_checkpoint

Tree = dict[str, Any]
BF16 = ml_dtypes.bfloat16
MAX_ENCODE_WEIGHTS = 1 << 30
"""Stacked experts are WINT2-encoded side by side in batches of at most this many weights."""
DEFAULT_CALIBRATION_TOKENS = 16384
"""Tokens of calibration text the bf16 model is run on (``--calibration-tokens``)."""
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
"""Absmax fractions tried for the WINT8/WINT4 per-column scale (least squared error wins)."""


# --------------------------------------------------------------------------------------------
# one linear
# --------------------------------------------------------------------------------------------


def quantize_weight_only_runtime(w, *, bits: int) -> dict[str, np.ndarray]:
    """Symmetric per-column int8/int4 of ``w [K, N]`` -> runtime ``<linear>`` leaves.

    Runtime layout (:mod:`jaxwint2.layout`): int8 ``quant_weight [K, N]`` (-127..127), or int4 as
    uint8 ``[K/2, N]`` with row ``2i`` in the low nibble, each stored as ``q + 8``; ``weight_scale``
    bf16 ``[N]``. The scale is the best of :data:`CLIP_FRACTIONS` of ``absmax / qmax``.
    """
    w = np.asarray(w, np.float32)
    qmax = {8: 127, 4: 7}[bits]
    amax = np.abs(w).max(0)
    best_err = np.full(w.shape[1], np.inf, np.float32)
    q_best = np.zeros(w.shape, np.int8)
    s_best = np.zeros(w.shape[1], np.float32)
    for f in CLIP_FRACTIONS:
        scale = (amax * f / qmax).astype(BF16).astype(np.float32)
        q = np.clip(np.rint(w / np.where(scale > 0, scale, 1)), -qmax - (bits == 4), qmax)
        err = ((w - q * scale) ** 2).sum(0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        q_best[:, better] = q[:, better]
        s_best = np.where(better, scale, s_best)
    scale = s_best.astype(BF16)
    if bits == 8:
        return {"quant_weight": q_best, "weight_scale": scale}
    u = (q_best.astype(np.int16) + 8).astype(np.uint8)
    return {"quant_weight": u[0::2] | (u[1::2] << 4), "weight_scale": scale}


def encode_wint2_runtime(w, *, hessian=None, k_order: str = "natural",
                         effort: str = "default") -> dict[str, np.ndarray]:
    """One ``[K, N]`` weight -> runtime WINT2 leaves (``super_scales`` widened to f32)."""
    enc = encode_wint2(w, hessian=hessian, k_order=k_order, effort=effort)
    enc["super_scales"] = enc["super_scales"].astype(np.float32)
    return enc


def quantize_linear(weight, fmt: str, *, hessian=None, k_order: str = "natural",
                    effort: str = "default") -> dict[str, np.ndarray]:
    """bf16 ``weight [K, N]`` or stacked experts ``[E, K, N]`` -> runtime leaves of ``fmt``.

    ``hessian`` (WINT2 only): ``[K, K]`` shared by all experts or ``[E, K, K]``. Without one,
    stacked experts are encoded side by side as one ``[K, E*N]`` matrix (columns are independent).
    """
    w = np.asarray(weight)
    if fmt == "bf16":
        return {"weight": w.astype(BF16)}
    if w.ndim == 3 and (fmt != "wint2" or hessian is not None):
        hs = [None] * w.shape[0] if hessian is None else (
            [hessian] * w.shape[0] if np.ndim(hessian) == 2 else list(hessian))
        per = [quantize_linear(w[e], fmt, hessian=hs[e], k_order=k_order, effort=effort)
               for e in range(w.shape[0])]
        return {key: np.stack([p[key] for p in per]) for key in per[0]}
    if fmt in ("wint8", "wint4"):
        return quantize_weight_only_runtime(w, bits=8 if fmt == "wint8" else 4)
    if fmt != "wint2":
        raise ValueError(f"unknown weight format {fmt!r}")
    if w.ndim == 3:  # [E, K, N] -> [K, E'*N] per batch of E' experts -> per expert
        e, k, n = w.shape
        step = max(1, MAX_ENCODE_WEIGHTS // (k * n))
        parts = []
        for e0 in range(0, e, step):
            we = w[e0:e0 + step]
            flat = encode_wint2_runtime(np.moveaxis(we, 0, 1).reshape(k, -1), k_order=k_order,
                                        effort=effort)
            parts.append({key: np.moveaxis(v.reshape(*v.shape[:-1], len(we), n), -2, 0)
                          for key, v in flat.items()})
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    return encode_wint2_runtime(w, hessian=hessian, k_order=k_order, effort=effort)


@functools.partial(jax.jit, static_argnames=("fmt", "k_order"))
def _error_sums(w, lin, fmt: str, k_order: str):
    """``(sum (W - W_hat)^2, sum W^2)`` of one (unstacked) linear, on the device, in f32."""
    w = w.astype(jnp.float32)
    wh = dequantize(lin, fmt, k_order=k_order, dtype=jnp.float32)
    return jnp.sum((w - wh) ** 2), jnp.sum(w * w)


def relative_error(weight, lin: dict[str, np.ndarray], fmt: str, k_order: str = "natural"
                   ) -> float:
    """``||W - W_hat||^2 / ||W||^2`` of a runtime linear against its source, expert by expert."""
    w = np.asarray(weight)
    stacked = w.ndim == 3
    num = den = 0.0
    for e in range(w.shape[0] if stacked else 1):
        sl = (lambda a, e=e: a[e]) if stacked else (lambda a: a)
        n_, d_ = _error_sums(sl(w), {k: sl(np.asarray(v)) for k, v in lin.items()}, fmt, k_order)
        num, den = num + float(n_), den + float(d_)
    return num / max(den, 1e-30)


# --------------------------------------------------------------------------------------------
# one part
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LinearReport:
    """Relative weight error ``||W - W_hat||^2 / ||W||^2`` of one quantized linear."""

    path: str
    fmt: str
    shape: tuple[int, ...]
    rel_error: float
    calibrated: bool = False


def quantize_part(qcfg: ErnieConfig, part: str, sub: Tree, *,
                  hessians: dict[str, np.ndarray] | None = None, effort: str = "default",
                  reports: list[LinearReport] | None = None) -> Tree:
    """Quantize one bf16 runtime part into ``qcfg``'s layout (checked against it).

    Args:
      qcfg: the quantized model config (its ``quant`` picks each linear's format).
      part: ``"embed"``, ``"layers/<i>"``, ``"final_norm"`` or ``"lm_head"``.
      sub: the part's bf16 runtime subtree.
      hessians: calibration Hessians by linear path (``"layers/7/mlp/experts/up_gate"``).
      effort: WINT2 search preset (:data:`converters.encode_wint2.EFFORT`).
      reports: if given, one :class:`LinearReport` per quantized linear is appended.
    """
    want = checkpoint.part_shapes(qcfg, part)
    k_order = qcfg.quant.k_order

    def walk(src: Tree, spec: Tree, path: str) -> Tree:
        out: Tree = {}
        for key, s in spec.items():
            p = f"{path}/{key}"
            if key not in src:
                raise CheckpointError(f"part {part!r}: source has no {p}")
            if isinstance(s, dict) and "weight" in src[key] and _is_linear_spec(s):
                fmt = linear_format(s)
                h = (hessians or {}).get(p) if fmt == "wint2" else None
                lin = quantize_linear(src[key]["weight"], fmt, hessian=h, k_order=k_order,
                                      effort=effort)
                if reports is not None and fmt != "bf16":
                    reports.append(_report(p, fmt, src[key]["weight"], lin, k_order, h))
                out[key] = lin
            elif isinstance(s, dict):
                out[key] = walk(src[key], s, p)
            else:
                out[key] = src[key]
        return out

    result = checkpoint.add_integer_codes(walk(sub, want, part))  # WINT2: code_a, code_b
    checkpoint.check_part(qcfg, part, result)
    return result


def _is_linear_spec(spec: Tree) -> bool:
    """A ``<linear>`` (not a norm, router or embedding, which pass through unchanged)."""
    if "quant_weight" in spec:
        return True
    return set(spec) == {"weight"} and len(spec["weight"].shape) >= 2


def _report(path, fmt, w, lin, k_order, h) -> LinearReport:
    err = relative_error(w, lin, fmt, k_order)
    return LinearReport(path, fmt, tuple(np.shape(w)), err, h is not None)


# --------------------------------------------------------------------------------------------
# the checkpoint
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QuantizeSummary:
    """What a quantization run did."""

    src: str
    dst: str
    source_format: str
    quantization_config: dict[str, Any]
    parts: int = 0
    seconds: float = 0.0
    linears: list[LinearReport] = dataclasses.field(default_factory=list)
    copied_files: list[str] = dataclasses.field(default_factory=list)

    def mean_error(self, fmt: str) -> float | None:
        errs = [r.rel_error for r in self.linears if r.fmt == fmt]
        return float(np.mean(errs)) if errs else None

    def line(self) -> str:
        by = ", ".join(f"{fmt} x{sum(r.fmt == fmt for r in self.linears)} mean "
                       f"{self.mean_error(fmt):.4f}" for fmt in ("wint8", "wint4", "wint2")
                       if self.mean_error(fmt) is not None)
        return (f"quantized {self.src} -> {self.dst}: {self.parts} parts in {self.seconds:.1f} s; "
                f"relative weight error ||W-W_hat||^2/||W||^2 by format: {by}")


def default_w4_end_layer(cfg: ErnieConfig) -> int:
    """The 300B 2-bit release's split: its first four MoE layers hold WINT4 experts."""
    return cfg.moe_layer_start_index + 3 * cfg.moe_layer_interval


def load_hessians(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Calibration file -> ``{linear path: Hessian}``.

    The file is a ``.safetensors`` or ``.npz`` of f32 Hessians ``X^T X / n`` of each WINT2 linear's
    inputs, keyed by runtime path with ``/`` or ``.`` separators
    (``layers.7.mlp.experts.up_gate``), shaped ``[K, K]`` (shared by the experts) or ``[E, K, K]``
    (:func:`converters.encode_gptq.hessian_from_activations` builds one from activations).
    """
    path = pathlib.Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                raw = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            raw = load_file(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable calibration file ({e})") from e
    return {k.replace(".", "/"): np.asarray(v, np.float32) for k, v in raw.items()}


def _check_hessians(qcfg: ErnieConfig, hessians: dict[str, np.ndarray], path) -> None:
    wint2 = {}
    for i in qcfg.moe_layers:
        if qcfg.expert_format(i) == "wint2":
            experts = checkpoint.part_shapes(qcfg, f"layers/{i}")["mlp"]["experts"]
            for name, lin in experts.items():
                e, k4, _ = lin["quant_weight"].shape
                wint2[f"layers/{i}/mlp/experts/{name}"] = (e, 4 * k4)
    for key, h in hessians.items():
        if key not in wint2:
            raise CheckpointError(f"{path}: calibration entry {key!r} is not a WINT2 linear "
                                  f"(expected one of {sorted(wint2)[:4]}...)")
        e, k = wint2[key]
        if h.shape not in ((k, k), (e, k, k)):
            raise CheckpointError(f"{path}: calibration entry {key!r} has shape {list(h.shape)}, "
                                  f"expected [{k}, {k}] or [{e}, {k}, {k}]")


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *,
                        w4_end_layer: int | None = None, calibration: str | None = None,
                        calibration_text: str | None = None,
                        calibration_tokens: int | None = None,
                        k_order: str = "natural", effort: str = "default",
                        num_shards: int = 2, force: bool = False,
                        progress: bool = True) -> QuantizeSummary:
    """Quantize the bf16 checkpoint ``src`` into a FastDeploy w4w2 Paddle checkpoint ``dst``.

    Args:
      src: bf16 ERNIE-4.5 MoE checkpoint (Paddle ``ernie.`` or HF ``model.`` layout).
      dst: output directory; must not exist unless ``force``.
      w4_end_layer: MoE layers with index ``<=`` this hold WINT4 experts, later ones WINT2
        (default :func:`default_w4_end_layer`; ``-1``: every MoE layer WINT2).
      calibration: optional Hessian file (:func:`load_hessians`) for the WINT2 linears.
      calibration_text: optional ``.txt`` / ``.jsonl`` text: the bf16 source model is run on its
        first ``calibration_tokens`` tokens (source tokenizer) layer by layer while quantizing,
        and each WINT2 expert's input Hessian (routed tokens only) drives the GPTQ-style byte
        choice (:class:`jaxwint2.calibrate.Calibrator`). Excludes ``calibration``.
      calibration_tokens: token budget of ``calibration_text`` (``None``:
        :data:`DEFAULT_CALIBRATION_TOKENS`).
      k_order: WINT2 in-group K order of the written bytes (wint2-format §3.2).
      effort: WINT2 search preset, ``"fast"`` / ``"default"`` / ``"best"``
        (:data:`converters.encode_wint2.EFFORT`).
      num_shards: safetensors files in the output.
      force: replace an existing ``dst``.
      progress: tqdm bar over the parts.

    Raises:
      CheckpointError: unreadable or already-quantized source, bad calibration file, existing
        ``dst``; ``dst`` is left untouched.

    Example:
      >>> s = quantize_checkpoint("ERNIE-4.5-21B-A3B-Paddle", "ernie-21b-w4w2")  # doctest: +SKIP
      >>> print(s.line())  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    dst = pathlib.Path(dst).absolute()
    if dst.exists() and not force:
        raise CheckpointError(f"{dst}: already exists (use --force to replace it)")
    if k_order not in ("natural", "shuffled"):
        raise CheckpointError(f"k_order must be 'natural' or 'shuffled', got {k_order!r}")
    if effort not in EFFORT:
        raise CheckpointError(f"effort must be one of {sorted(EFFORT)}, got {effort!r}")
    cfg, meta, parts = iter_checkpoint(src)
    if cfg.quant.dense != "bf16" or cfg.quant.moe != "bf16":
        raise CheckpointError(f"{src}: already quantized ({cfg.quant.to_dict()}); "
                              "the quantizer needs a bf16 checkpoint")
    w4 = default_w4_end_layer(cfg) if w4_end_layer is None else w4_end_layer
    qcfg = cfg.replace(quant=QuantConfig(dense="wint8", moe="wint2", w4_end_layer=w4,
                                         k_order=k_order))
    if calibration and calibration_text:
        raise CheckpointError("give either a Hessian file or calibration text, not both")
    hessians = load_hessians(calibration) if calibration else {}
    _check_hessians(qcfg, hessians, calibration)
    calibrator = _text_calibrator(
        src, qcfg, calibration_text,
        DEFAULT_CALIBRATION_TOKENS if calibration_tokens is None else calibration_tokens)
    summary = QuantizeSummary(src=str(src), dst=str(dst),
                              source_format=meta.get("source_format", "?"),
                              quantization_config=qcfg.quant.to_dict())
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")
    names = checkpoint.part_names(qcfg)
    bar = _progress(len(names), progress)
    stream = _quantized_parts(qcfg, parts, hessians, effort, summary, bar, calibrator)
    try:
        write_paddle_checkpoint(qcfg, lambda part: _next_part(stream, part), tmp,
                                num_shards=num_shards, bf16_header="BF16")
        bar.close()
        summary.copied_files = _copy_aux(pathlib.Path(src), tmp)
        replace_dir(tmp, dst, force, what="quantization")
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.seconds = time.perf_counter() - t0
    return summary


def _text_calibrator(src, qcfg: ErnieConfig, text, max_tokens: int):
    """The :class:`jaxwint2.calibrate.Calibrator` of ``text`` (None without text)."""
    if not text:
        return None
    from jaxwint2 import calibrate

    if max_tokens < 2:
        raise CheckpointError(f"calibration_tokens must be at least 2, got {max_tokens}")
    try:
        ids = calibrate.tokenize_file(src, text, max_tokens=max_tokens)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"calibration text {text}: {e}") from e
    return calibrate.Calibrator(
        qcfg, ids, wanted=lambda i: qcfg.is_moe_layer(i) and qcfg.expert_format(i) == "wint2")


def _quantized_parts(qcfg, parts, hessians, effort, summary, bar, calibrator=None
                     ) -> Iterator[tuple[str, Tree]]:
    for part, sub in parts:
        bar.set_postfix_str(part)
        part_h = hessians
        if calibrator is not None:  # this layer's Hessians, from the bf16 layer itself
            bar.set_postfix_str(f"{part} (calibration)")
            part_h = {**hessians, **calibrator.observe(part, sub)}
        out = quantize_part(qcfg, part, sub, hessians=part_h, effort=effort,
                            reports=summary.linears)
        del sub
        summary.parts += 1
        bar.update(1)
        yield part, out


def _next_part(stream: Iterator[tuple[str, Tree]], want: str) -> Tree:
    part, sub = next(stream)
    if part != want:  # the reader and the writer walk the same part list
        raise CheckpointError(f"internal: reader gave part {part!r}, writer wants {want!r}")
    return sub


def _copy_aux(src: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Tokenizer and generation files (``config.json`` is the writer's, with quantization)."""
    copied = []
    for name in AUX_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="quantize", unit="part", disable=not enabled)

