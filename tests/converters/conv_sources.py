"""Independent reading of source checkpoints for the tests: the ``safetensors`` library (torch
frontend), not the converter's own reader, and the doc's name table written out by hand."""

import json
import pathlib

import ml_dtypes
import numpy as np
import torch
from safetensors import safe_open

from jaxwint2 import ErnieConfig


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.uint16):  # U16 headers hold bf16 bit patterns
        return t.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)
    return t.numpy()


def read_all(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (single file or index + shards)."""
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
             else [p.name for p in sorted(path.glob("*.safetensors"))])
    out = {}
    for f in files:
        with safe_open(path / f, framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = _to_numpy(st.get_tensor(k))
    return out


# runtime linear path -> Paddle name under ernie.layers.{i}. ({e}: routed expert)
PADDLE_LINEARS = {
    ("attn", "qkv"): "self_attn.qkv_proj", ("attn", "o"): "self_attn.o_proj",
    ("mlp", "up_gate"): "mlp.up_gate_proj", ("mlp", "down"): "mlp.down_proj",
    ("mlp", "experts", "up_gate"): "mlp.experts.{e}.up_gate_proj",
    ("mlp", "experts", "down"): "mlp.experts.{e}.down_proj",
    ("mlp", "shared", "up_gate"): "mlp.shared_experts.up_gate_proj",
    ("mlp", "shared", "down"): "mlp.shared_experts.down_proj",
}


def f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def tp4_config() -> ErnieConfig:
    """Tiny, but every K and N slices cleanly over 4 ranks (WINT2 down: one 64-row group each)."""
    return ErnieConfig.tiny(head_dim=64, moe_intermediate_size=256, intermediate_size=256)
