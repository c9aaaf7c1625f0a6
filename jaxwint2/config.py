"""``ErnieConfig``: the ERNIE-4.5 MoE text model's hyper-parameters and per-layer weight formats.

Owns the reading of ``config.json`` (both the FastDeploy/Paddle and the HF ``-PT`` flavours, and
FastDeploy's ``quantization_config`` semantics, ``shared/docs/wint2-format.md`` §2) and the
answer to "which layer is MoE, and which format holds each linear". Knows nothing about tensors
or files beyond the JSON dict it is given.

Example:
  >>> cfg = ErnieConfig.ernie45_300b_a47b()
  >>> cfg.is_moe_layer(3), cfg.expert_format(3), cfg.expert_format(7), cfg.dense_format
  (True, 'wint4', 'wint2', 'wint8')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

Format = Literal["bf16", "wint8", "wint4", "wint2"]
KOrder = Literal["natural", "shuffled"]


class ConfigError(ValueError):
    """A ``config.json`` we cannot honour; the message names the field."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """FastDeploy ``quantization_config`` (w4w2 mix) in resolved form.

    ``dense`` is the format of every non-MoE linear (attention, dense MLP, shared experts);
    MoE layers with decoder index ``<= w4_end_layer`` hold WINT4 experts, later ones ``moe``.
    """

    dense: Format = "bf16"
    moe: Format = "bf16"
    w4_end_layer: int = -1
    k_order: KOrder = "natural"

    @classmethod
    def from_dict(cls, q: dict[str, Any] | None) -> QuantConfig:
        if not q:
            return cls()
        dense = q.get("dense_quant_type", "wint8")
        moe_type = q.get("moe_quant_type", q.get("quantization", "wint2"))
        if dense not in ("wint8", "wint4", "bf16"):
            raise ConfigError(f"quantization_config.dense_quant_type={dense!r} is not supported "
                              "(expected 'wint8')")
        sub = q.get("moe_quant_config", {}) or {}
        if moe_type == "w4w2":
            w4 = sub.get("moe_w4_quant_config", {}) or {}
            w2 = sub.get("moe_w2_quant_config", {}) or {}
            if w4.get("quant_type", "wint4") != "wint4":
                raise ConfigError("quantization_config.moe_quant_config.moe_w4_quant_config."
                                  f"quant_type={w4.get('quant_type')!r}; expected 'wint4'")
            if w2.get("quant_type", "wint2") != "wint2":
                raise ConfigError("quantization_config.moe_quant_config.moe_w2_quant_config."
                                  f"quant_type={w2.get('quant_type')!r}; expected 'wint2'")
            gs = w2.get("quant_group_size", 64)
            if gs != 64:
                raise ConfigError("quantization_config.moe_quant_config.moe_w2_quant_config."
                                  f"quant_group_size={gs}; only 64 is supported")
            return cls(dense=dense, moe="wint2", w4_end_layer=int(w4.get("quant_end_layer", -1)))
        if moe_type in ("wint2", "wint4", "wint8"):
            return cls(dense=dense, moe=moe_type, w4_end_layer=-1)
        raise ConfigError(f"quantization_config.moe_quant_type={moe_type!r} is not supported "
                          "(expected 'w4w2', 'wint2', 'wint4' or 'wint8')")

    def to_dict(self) -> dict[str, Any]:
        """FastDeploy-style ``quantization_config`` (empty for a plain bf16 model)."""
        if self.dense == "bf16" and self.moe == "bf16":
            return {}
        if self.moe == "wint2" and self.w4_end_layer >= 0:
            return {
                "dense_quant_type": self.dense, "moe_quant_type": "w4w2", "quantization": "wint2",
                "moe_quant_config": {
                    "moe_w4_quant_config": {"quant_type": "wint4", "quant_granularity":
                                            "per_channel", "quant_start_layer": 0,
                                            "quant_end_layer": self.w4_end_layer},
                    "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc",
                                            "quant_group_size": 64,
                                            "quant_start_layer": self.w4_end_layer + 1,
                                            "quant_end_layer": 10**6}}}
        return {"dense_quant_type": self.dense, "moe_quant_type": self.moe,
                "quantization": self.moe}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErnieConfig:
    """Hyper-parameters of an ERNIE-4.5 MoE causal LM (``Ernie4_5_MoeForCausalLM``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    moe_num_experts: int
    moe_k: int
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int
    moe_layer_end_index: int
    moe_layer_interval: int = 1
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)

    # ---- derived ----
    @functools.cached_property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @functools.cached_property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @functools.cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def is_moe_layer(self, i: int) -> bool:
        return ((i + 1) % self.moe_layer_interval == 0
                and self.moe_layer_start_index <= i <= self.moe_layer_end_index)

    @property
    def dense_format(self) -> Format:
        """Format of every non-MoE linear: attention, dense MLP, shared experts."""
        return self.quant.dense

    def expert_format(self, i: int) -> Format:
        """Format of the routed experts of MoE layer ``i`` (FastDeploy's w4w2 rule)."""
        if not self.is_moe_layer(i):
            raise ValueError(f"layer {i} is not a MoE layer")
        if self.quant.moe == "wint2" and i <= self.quant.w4_end_layer:
            return "wint4"
        return self.quant.moe

    # ---- I/O ----
    @classmethod
    def from_hf_config(cls, d: dict[str, Any]) -> ErnieConfig:
        """Build from a ``config.json`` dict (Paddle or HF flavour)."""

        def need(key: str):
            if key not in d:
                raise ConfigError(f"config.json has no field {key!r}")
            return d[key]

        layers = int(need("num_hidden_layers"))
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        end = int(d.get("moe_layer_end_index", -1))
        rope = d.get("rope_theta")
        if rope is None:
            rope = (d.get("rope_parameters") or {}).get("rope_theta", 500000.0)
        eos = d.get("eos_token_id", 2)
        head_dim = d.get("head_dim") or hidden // heads
        n_experts = d.get("moe_num_experts", 0)
        if isinstance(n_experts, list):
            raise ConfigError("config.json moe_num_experts is a list (multimodal model); "
                              "only text ERNIE-4.5 MoE models are supported")
        moe_k = int(d.get("moe_k", 0) or 0)
        if n_experts and not 0 < moe_k <= n_experts:
            raise ConfigError(f"config.json moe_k={moe_k} must be in "
                              f"1..moe_num_experts={n_experts}")
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            moe_intermediate_size=int(d.get("moe_intermediate_size", 0) or 0),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rope_theta=float(rope),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            moe_num_experts=int(n_experts or 0),
            moe_k=moe_k,
            moe_num_shared_experts=int(d.get("moe_num_shared_experts", 0) or 0),
            moe_layer_start_index=int(d.get("moe_layer_start_index", 0)
                                      if n_experts else layers),
            moe_layer_end_index=layers - 1 if end == -1 else end,
            moe_layer_interval=int(d.get("moe_layer_interval", 1) or 1),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
            bos_token_id=int(d.get("bos_token_id", 1) or 1),
            eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
            pad_token_id=int(d.get("pad_token_id", 0) or 0),
            quant=QuantConfig.from_dict(d.get("quantization_config")),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` dict (Paddle flavour; HF's ``Ernie4_5_MoeConfig`` reads it too)."""
        d = {
            "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
            "hidden_act": "silu", "use_bias": False, "moe_norm_min": 1e-12,
        }
        for f in dataclasses.fields(self):
            if f.name != "quant":
                d[f.name] = getattr(self, f.name)
        if q := self.quant.to_dict():
            d["quantization_config"] = q
        return d

    def replace(self, **kw) -> ErnieConfig:
        return dataclasses.replace(self, **kw)

    # ---- presets ----
    @classmethod
    def ernie45_300b_a47b(cls, quant: QuantConfig | None = None) -> ErnieConfig:
        """ERNIE-4.5-300B-A47B; ``quant`` defaults to the 2-bit release's w4w2 mix."""
        return cls(vocab_size=103424, hidden_size=8192, intermediate_size=28672,
                   moe_intermediate_size=3584, num_hidden_layers=54, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=128, moe_num_experts=64, moe_k=8,
                   moe_num_shared_experts=0, moe_layer_start_index=3, moe_layer_end_index=53,
                   tie_word_embeddings=False,
                   quant=quant or QuantConfig(dense="wint8", moe="wint2", w4_end_layer=6))

    @classmethod
    def ernie45_21b_a3b(cls, quant: QuantConfig | None = None) -> ErnieConfig:
        """ERNIE-4.5-21B-A3B; ``quant`` defaults to WINT8 dense + WINT2 experts everywhere."""
        return cls(vocab_size=103424, hidden_size=2560, intermediate_size=12288,
                   moe_intermediate_size=1536, num_hidden_layers=28, num_attention_heads=20,
                   num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6,
                   moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=27,
                   tie_word_embeddings=True,
                   quant=quant or QuantConfig(dense="wint8", moe="wint2", w4_end_layer=-1))

    @classmethod
    def tiny(cls, quant: QuantConfig | None = None, **kw) -> ErnieConfig:
        """A few-MB config with every feature: dense layer, WINT4 and WINT2 MoE layers."""
        base = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                    moe_intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2,
                    moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3,
                    tie_word_embeddings=False, max_position_embeddings=4096,
                    quant=quant or QuantConfig(dense="wint8", moe="wint2", w4_end_layer=1))
        base.update(kw)
        return cls(**base)
