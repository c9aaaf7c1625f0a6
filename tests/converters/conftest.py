"""Real-file fixtures for the converter tests: tiny Paddle (w4w2, bf16, rank-sharded) and HF
checkpoints, written once per session."""

import pathlib

import numpy as np
import pytest
from conv_sources import tp4_config

import converters
from jaxwint2 import ErnieConfig, QuantConfig
from jaxwint2.testing import random_params, write_hf_checkpoint

MTP = {"ernie.mtp_block.0.input_layernorm.weight": np.ones(128, np.float32),
       "mtp_emb_norm.weight": np.ones(128, np.float32)}


@pytest.fixture(scope="session")
def tiny_cfg() -> ErnieConfig:
    return ErnieConfig.tiny()


@pytest.fixture(scope="session")
def tiny_params(tiny_cfg):
    return random_params(tiny_cfg, seed=0)


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory, tiny_cfg, tiny_params) -> dict[str, pathlib.Path]:
    """Source checkpoints by flavour; each is converted by the tests that need it."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    out["w4w2_bf16"] = converters.write_paddle_checkpoint(
        tiny_cfg, tiny_params, root / "w4w2_bf16", num_shards=3, bf16_header="BF16",
        extra_tensors=MTP)
    (out["w4w2_bf16"] / "tokenizer.model").write_bytes(b"\x0a\x03sentencepiece-bytes")
    (out["w4w2_bf16"] / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    out["w4w2_u16"] = converters.write_paddle_checkpoint(
        tiny_cfg, tiny_params, root / "w4w2_u16", num_shards=2, bf16_header="U16",
        lm_head_out_in=True)
    plain = ErnieConfig.tiny(QuantConfig(), tie_word_embeddings=True)
    out["plain"] = converters.write_paddle_checkpoint(
        plain, random_params(plain, seed=1), root / "plain", num_shards=1, bf16_header="U16")
    out["tp2"] = converters.write_paddle_checkpoint(
        tiny_cfg, tiny_params, root / "tp2", num_shards=2, tp_size=2, bf16_header="U16")
    cfg4 = tp4_config()
    out["tp4"] = converters.write_paddle_checkpoint(
        cfg4, random_params(cfg4, seed=2), root / "tp4", num_shards=2, tp_size=4)
    return out


@pytest.fixture(scope="session")
def hf_ckpts(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("hf")
    write_hf_checkpoint(root / "untied", seed=0, tie_word_embeddings=False)
    write_hf_checkpoint(root / "tied", seed=1, tie_word_embeddings=True, shared_experts=0)
    return {"untied": root / "untied", "tied": root / "tied"}
