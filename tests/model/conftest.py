"""Fixtures of the model tests: tiny configs, random runtime-layout params, dense oracle weights."""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import pallas_kernels
from jaxwint2 import layout
from jaxwint2.config import ErnieConfig

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "reference"))

BF16 = ml_dtypes.bfloat16


def _linear(rng: np.random.Generator, spec: dict, fmt: str, std: float) -> dict:
    """Random leaves of one ``<linear>`` whose dequantized weights have about ``std``."""
    shape = spec["quant_weight" if fmt != "bf16" else "weight"].shape
    n_shape = shape[:-2] + shape[-1:]
    if fmt == "bf16":
        return {"weight": (rng.standard_normal(shape) * std).astype(BF16)}
    if fmt == "wint8":
        return {"quant_weight": rng.integers(-127, 128, shape, dtype=np.int8),
                "weight_scale": rng.uniform(0.5, 1.5, n_shape).astype(BF16) * BF16(std / 73)}
    if fmt == "wint4":
        return {"quant_weight": rng.integers(0, 256, shape, dtype=np.uint8),
                "weight_scale": rng.uniform(0.5, 1.5, n_shape).astype(BF16) * BF16(std / 4.6)}
    ws_shape = spec["weight_scale"].shape
    return {"quant_weight": rng.integers(0, 256, shape, dtype=np.uint8),
            "weight_scale": rng.integers(0, 256, ws_shape, dtype=np.uint8),
            "super_scales": (rng.uniform(0.5, 1.5, n_shape) * std / 150).astype(BF16)
            .astype(np.float32),
            # Dyadic code_scale / code_zp: u * cs + zp is exact in fp32, so the traced decode
            # gives the same codes fused (inside jit) or not (eager): the oracle sees the same
            # weights as the model. (Non-dyadic values are the decode tests' business.)
            "code_scale": (np.round(rng.uniform(100.0, 128.0, n_shape) * 64) / 64)
            .astype(np.float32),
            "code_zp": (np.round(rng.uniform(0.0, 300.0, n_shape) * 8) / 8).astype(np.float32)}


def make_params(cfg: ErnieConfig, seed: int = 0, *, bias_center: float = 30.0) -> dict:
    """A random runtime-layout tree for ``cfg`` (NumPy leaves; all formats realistic)."""
    rng = np.random.default_rng(seed)
    shapes = layout.param_shapes(cfg)

    def linear(spec, std=0.05):
        return _linear(rng, spec, layout.linear_format(spec), std)

    def norm(spec):
        return (1.0 + 0.1 * rng.standard_normal(spec["weight"].shape)).astype(np.float32)

    layers = []
    for i, ls in enumerate(shapes["layers"]):
        mlp = ls["mlp"]
        if cfg.is_moe_layer(i):
            e = cfg.moe_num_experts
            m = {"router": {"weight": rng.standard_normal((cfg.hidden_size, e))
                            .astype(np.float32) * 0.3,
                            "bias": (bias_center + rng.uniform(-0.05, 0.05, e))
                            .astype(np.float32)},
                 "experts": {"up_gate": linear(mlp["experts"]["up_gate"]),
                             "down": linear(mlp["experts"]["down"])}}
            if "shared" in mlp:
                m["shared"] = {"up_gate": linear(mlp["shared"]["up_gate"]),
                               "down": linear(mlp["shared"]["down"])}
        else:
            m = {"up_gate": linear(mlp["up_gate"]), "down": linear(mlp["down"])}
        layers.append({"input_norm": {"weight": norm(ls["input_norm"])},
                       "post_attention_norm": {"weight": norm(ls["post_attention_norm"])},
                       "attn": {"qkv": linear(ls["attn"]["qkv"], 0.08),
                                "o": linear(ls["attn"]["o"])},
                       "mlp": m})
    params = {"embed": {"weight": rng.standard_normal(shapes["embed"]["weight"].shape)
                        .astype(BF16)},
              "layers": layers,
              "final_norm": {"weight": norm(shapes["final_norm"])}}
    if "lm_head" in shapes:
        params["lm_head"] = {"weight": (rng.standard_normal(shapes["lm_head"]["weight"].shape)
                                        * 0.1).astype(BF16)}
    return params


@functools.partial(jax.jit, static_argnames=("fmt", "k_order"))
def _dequantize(w, fmt, k_order):
    return pallas_kernels.dequantize(w, fmt, k_order=k_order, dtype=jnp.float32)


def _dense(w: dict, k_order: str = "natural") -> np.ndarray:
    return np.asarray(_dequantize(w, layout.linear_format(w), k_order), np.float64)


def dense_weights(cfg: ErnieConfig, params: dict, k_order: str = "natural") -> dict:
    """Runtime params -> the NumPy oracle's dense float64 weight dict."""
    layers = []
    for i, lp in enumerate(params["layers"]):
        lw = {"input_norm": lp["input_norm"]["weight"],
              "post_attention_norm": lp["post_attention_norm"]["weight"],
              "qkv": _dense(lp["attn"]["qkv"]), "o": _dense(lp["attn"]["o"])}
        mlp = lp["mlp"]
        if cfg.is_moe_layer(i):
            lw.update(router=mlp["router"]["weight"], bias=mlp["router"]["bias"],
                      experts_up_gate=_dense(mlp["experts"]["up_gate"], k_order),
                      experts_down=_dense(mlp["experts"]["down"], k_order))
            if "shared" in mlp:
                lw.update(shared_up_gate=_dense(mlp["shared"]["up_gate"]),
                          shared_down=_dense(mlp["shared"]["down"]))
        else:
            lw.update(up_gate=_dense(mlp["up_gate"]), down=_dense(mlp["down"]))
        layers.append({k: np.asarray(v, np.float64) for k, v in lw.items()})
    return {"embed": np.asarray(params["embed"]["weight"], np.float64),
            "final_norm": np.asarray(params["final_norm"]["weight"], np.float64),
            "lm_head": (np.asarray(params["lm_head"]["weight"], np.float64)
                        if "lm_head" in params else None),
            "layers": layers}


@pytest.fixture(scope="session")
def tiny_cfg() -> ErnieConfig:
    return ErnieConfig.tiny()


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg) -> dict:
    return make_params(tiny_cfg, seed=0)
