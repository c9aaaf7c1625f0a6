"""Test and demo helpers shared across areas: realistic random runtime trees, tiny HF checkpoints.

* :func:`random_params` / :func:`random_part`: a NumPy runtime tree (:mod:`jaxwint2.layout`)
  with realistic statistics: WINT2 experts whose codes stay inside 15 bits and whose decoded
  weights have std ~0.02 (``code_a`` / ``code_b`` fitted, as the converter stores them),
  WINT8/WINT4 from quantizing Gaussian weights, fp32 router ~N(0, 0.02), correction bias ~30 +-
  0.05, norms ~1 +- 0.1 (bf16-exact), bf16 embeddings with std ~0.02.
* :func:`write_hf_checkpoint`: a tiny random ``transformers.Ernie4_5_MoeForCausalLM`` saved with
  ``save_pretrained`` (torch and transformers are imported only there).

Nothing here reads checkpoints; writing Paddle-layout files is :mod:`converters.paddle_writer`.
"""

from __future__ import annotations

import os
import pathlib
import zlib
from typing import Any

import ml_dtypes
import numpy as np

from .checkpoint import add_integer_codes, assemble, part_names, part_shapes
from .config import ErnieConfig

BF16 = ml_dtypes.bfloat16
Tree = dict[str, Any]


def _bf16_exact(x: np.ndarray) -> np.ndarray:
    """f32 values that bf16 represents exactly (so a bf16 file round-trips them)."""
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def _quantize(w: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-column quantization of ``w [K, N]`` -> (int q, bf16 scale ``[N]``)."""
    scale = (np.abs(w).max(axis=-2) / qmax).astype(BF16)
    s = np.where(scale == 0, 1.0, scale.astype(np.float32))[..., None, :]
    q = np.clip(np.rint(w / s), -qmax - (qmax == 7), qmax).astype(np.int8)
    return q, scale


def random_linear(rng: np.random.Generator, fmt: str, k: int, n: int,
                  experts: int | None = None, std: float = 0.02) -> dict[str, np.ndarray]:
    """One runtime ``<linear>`` of format ``fmt`` (``[E, ...]`` leaves when ``experts``)."""
    e = () if experts is None else (experts,)
    if fmt in ("bf16", "wint8", "wint4") and experts is not None:  # one expert at a time:
        parts = [random_linear(rng, fmt, k, n, None, std) for _ in range(experts)]  # bounded
        return {key: np.stack([p[key] for p in parts]) for key in parts[0]}  # f32 temporaries
    if fmt == "bf16":
        return {"weight": (rng.standard_normal((k, n), np.float32) * std).astype(BF16)}
    if fmt in ("wint8", "wint4"):
        w = rng.standard_normal((k, n), np.float32) * std
        q, scale = _quantize(w, 127 if fmt == "wint8" else 7)
        if fmt == "wint8":
            return {"quant_weight": q, "weight_scale": scale}
        u = (q.astype(np.int16) + 8).astype(np.uint8)
        return {"quant_weight": u[0::2, :] | (u[1::2, :] << 4), "weight_scale": scale}
    if fmt == "wint2":
        # code = floor(u * cs + zp + 0.5) must stay in 15 bits: cs in [32, 128] (multiples of
        # 1/64), zp >= 0 with 255 * cs + zp < 32768. Decoded q ~ U(-32, 31), nib ~ U(1, 15):
        # std(q * nib) ~ 170, so super_scales ~ 0.02 / 170 gives weights of std ~0.02.
        cs = rng.integers(32 * 64, 128 * 64 + 1, (*e, n)).astype(np.float32) / 64
        zp_max = 32767 - 255 * cs
        zp = np.floor(rng.uniform(0, 1, (*e, n)) * zp_max * 64).astype(np.float32) / 64
        ss = _bf16_exact(std / 170 * rng.uniform(0.7, 1.3, (*e, n)))
        return add_integer_codes({
            "quant_weight": rng.integers(0, 256, (*e, k // 4, n), dtype=np.uint8),
            "weight_scale": rng.integers(0x11, 256, (*e, -(-k // 128), n), dtype=np.uint8) | 0x11,
            "super_scales": ss, "code_scale": cs, "code_zp": zp})
    raise ValueError(f"unknown weight format {fmt!r}")


def random_part(cfg: ErnieConfig, part: str, seed: int = 0) -> Tree:
    """One part (``embed``, ``layers/<i>``, ``final_norm``, ``lm_head``) of a random tree.

    Each part has its own generator (seeded by ``seed`` and the part name), so parts can be made
    one at a time (multi-GB synthetic checkpoints) and still equal :func:`random_params`'s.
    """
    rng = np.random.default_rng([seed, zlib.crc32(part.encode())])
    shapes = part_shapes(cfg, part)

    def build(node: Tree, path: tuple[str, ...]) -> Tree:
        out: Tree = {}
        for key, s in node.items():
            p = (*path, key)
            if key != "router" and _is_linear(s):
                out[key] = _linear_like(rng, s)
            elif isinstance(s, dict):
                out[key] = build(s, p)
            else:
                out[key] = _leaf(rng, p, s)
        return out

    return build(shapes, (part,))


def _is_linear(s) -> bool:
    if not isinstance(s, dict) or any(isinstance(v, dict) for v in s.values()):
        return False
    main = s.get("weight", s.get("quant_weight"))
    return main is not None and len(main.shape) >= 2


def _linear_like(rng, shapes: Tree) -> dict[str, np.ndarray]:
    from .layout import linear_format

    fmt = linear_format(shapes)
    main = shapes.get("weight", shapes.get("quant_weight"))
    pack = {"bf16": 1, "wint8": 1, "wint4": 2, "wint2": 4}[fmt]
    *e, kp, n = main.shape
    return random_linear(rng, fmt, kp * pack, n, e[0] if e else None)


def _leaf(rng, path: tuple[str, ...], s) -> np.ndarray:
    name = "/".join(path)
    if "norm" in name:
        return _bf16_exact(1 + 0.1 * rng.uniform(-1, 1, s.shape))
    if path[-2:] == ("router", "weight"):
        return (rng.standard_normal(s.shape) * 0.02).astype(np.float32)
    if path[-2:] == ("router", "bias"):
        return (30 + 0.05 * rng.uniform(-1, 1, s.shape)).astype(np.float32)
    if s.dtype == np.dtype(BF16):  # embed, lm_head
        return (rng.standard_normal(s.shape, np.float32) * 0.02).astype(BF16)
    raise ValueError(f"no random rule for leaf {name} {s}")


def random_params(cfg: ErnieConfig, seed: int = 0) -> Tree:
    """A full random runtime tree for ``cfg`` (host NumPy; see the module docstring).

    Example:
      >>> params = random_params(ErnieConfig.tiny(), seed=0)
      >>> params["layers"][3]["mlp"]["experts"]["up_gate"]["quant_weight"].shape
      (8, 32, 256)
    """
    return assemble(cfg, ((p, random_part(cfg, p, seed)) for p in part_names(cfg)))


# --------------------------------------------------------------------------------------------
# HF fixture
# --------------------------------------------------------------------------------------------


def hf_config_kwargs(cfg: ErnieConfig) -> dict[str, Any]:
    """``transformers.Ernie4_5_MoeConfig`` keyword arguments for an :class:`ErnieConfig`."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
                moe_intermediate_size=cfg.moe_intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                moe_num_experts=cfg.moe_num_experts, moe_k=cfg.moe_k,
                moe_num_shared_experts=cfg.moe_num_shared_experts,
                moe_layer_start_index=cfg.moe_layer_start_index,
                moe_layer_end_index=cfg.moe_layer_end_index,
                moe_layer_interval=cfg.moe_layer_interval,
                tie_word_embeddings=cfg.tie_word_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                max_position_embeddings=cfg.max_position_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def write_hf_checkpoint(dst: str | os.PathLike, *, seed: int = 0, tie_word_embeddings: bool = False,
                        shared_experts: int = 1, dtype: str = "bfloat16",
                        **cfg_overrides) -> ErnieConfig:
    """Save a tiny random ``Ernie4_5_MoeForCausalLM`` with ``save_pretrained`` (HF ``-PT`` layout).

    Weights are N(0, 0.02), norms 1 +- 0.1, ``e_score_correction_bias`` 30 +- 0.05. The config is
    ``ErnieConfig.tiny(**cfg_overrides)`` without quantization.

    Returns:
      The :class:`ErnieConfig` of the saved model (as read back from its ``config.json``).
    """
    import torch
    import transformers

    from .config import QuantConfig

    cfg = ErnieConfig.tiny(QuantConfig(), tie_word_embeddings=tie_word_embeddings,
                           moe_num_shared_experts=shared_experts, **cfg_overrides)
    torch.manual_seed(seed)
    hf_cfg = transformers.Ernie4_5_MoeConfig(**hf_config_kwargs(cfg))
    model = transformers.Ernie4_5_MoeForCausalLM(hf_cfg)
    model = model.to(getattr(torch, dtype))
    for name, p in model.named_parameters():  # as HF's _keep_in_fp32_modules_strict does
        if name.endswith("mlp.gate.weight") or "moe_statics" in name:
            p.data = p.data.float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # filled after the cast: the fp32 bias keeps its +-0.05 spread
        for name, p in model.named_parameters():
            if "norm" in name:
                x = 1 + 0.1 * (2 * torch.rand(p.shape, generator=g) - 1)
            elif "e_score_correction_bias" in name:
                x = 30 + 0.05 * (2 * torch.rand(p.shape, generator=g) - 1)
            else:
                x = 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(x.to(p.dtype))
    dst = pathlib.Path(dst)
    model.save_pretrained(dst)
    import json

    return ErnieConfig.from_hf_config(json.loads((dst / "config.json").read_text()))
