"""Paddle checkpoints (w4w2 sharded with BF16 / U16 headers, plain bf16) -> converted -> every
tensor compared with its source, read independently with the safetensors library."""

import numpy as np
import pytest
from conv_sources import PADDLE_LINEARS, f32, read_all

import converters
import pallas_kernels as pk
from jaxwint2 import checkpoint
from jaxwint2.layout import linear_format


@pytest.fixture(scope="module")
def converted(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for name in ("w4w2_bf16", "w4w2_u16", "plain"):
        summary = converters.convert_checkpoint(ckpts[name], root / name, progress=False)
        out[name] = (root / name, summary)
    return out


def _linears(tree, path=()):
    for k, v in tree.items():
        if isinstance(v, dict) and ("weight" in v or "quant_weight" in v) and v.get(
                "weight", v.get("quant_weight")).ndim >= 2 and k != "router":
            yield (*path, k), v
        elif isinstance(v, dict):
            yield from _linears(v, (*path, k))


def _check_linear(src, prefix, lin):
    """Compare one runtime linear (no expert axis) with its Paddle tensors; return names used."""
    fmt = linear_format(lin)
    if fmt == "bf16":
        np.testing.assert_array_equal(f32(lin["weight"]), f32(src[f"{prefix}.weight"]))
        return {f"{prefix}.weight"}
    names = {f"{prefix}.quant_weight", f"{prefix}.weight_scale"}
    if fmt == "wint2":  # lossless: the bytes and scales themselves
        for leaf in ("quant_weight", "weight_scale", "code_scale", "code_zp"):
            s = src[f"{prefix}.{leaf}"]
            assert lin[leaf].dtype == s.dtype
            np.testing.assert_array_equal(lin[leaf], s)
        np.testing.assert_array_equal(lin["super_scales"], f32(src[f"{prefix}.super_scales"]))
        return names | {f"{prefix}.{x}" for x in ("super_scales", "code_scale", "code_zp")}
    bits = 8 if fmt == "wint8" else 4
    want = converters.dequantize_weight_only(src[f"{prefix}.quant_weight"],
                                             src[f"{prefix}.weight_scale"], bits=bits)
    got = pk.dequantize({k: np.asarray(v) for k, v in lin.items()}, fmt)
    np.testing.assert_array_equal(f32(got), f32(want))
    return names


def check_against_paddle(cfg, params, src):
    """Every runtime leaf equals its Paddle source; every source tensor but mtp* is used."""
    used = {"ernie.embed_tokens.weight", "ernie.norm.weight"}
    np.testing.assert_array_equal(f32(params["embed"]["weight"]),
                                  f32(src["ernie.embed_tokens.weight"]))
    np.testing.assert_array_equal(params["final_norm"]["weight"], f32(src["ernie.norm.weight"]))
    if not cfg.tie_word_embeddings:
        head = src["lm_head.weight"]
        head = head if head.shape == (cfg.hidden_size, cfg.vocab_size) else head.T
        np.testing.assert_array_equal(f32(params["lm_head"]["weight"]), f32(head))
        used.add("lm_head.weight")
    for i, layer in enumerate(params["layers"]):
        pre = f"ernie.layers.{i}."
        for leaf, name in [("input_norm", "input_layernorm"),
                           ("post_attention_norm", "post_attention_layernorm")]:
            np.testing.assert_array_equal(layer[leaf]["weight"], f32(src[f"{pre}{name}.weight"]))
            used.add(f"{pre}{name}.weight")
        if cfg.is_moe_layer(i):
            router = layer["mlp"]["router"]
            assert router["weight"].dtype == np.float32
            np.testing.assert_array_equal(router["weight"], src[f"{pre}mlp.gate.weight"])
            bias = src[f"{pre}mlp.moe_statics.e_score_correction_bias"]
            np.testing.assert_array_equal(router["bias"], bias.reshape(-1))
            used |= {f"{pre}mlp.gate.weight", f"{pre}mlp.moe_statics.e_score_correction_bias"}
        for path, lin in _linears(layer):
            name = pre + PADDLE_LINEARS[path]
            if "{e}" in name:
                for e in range(cfg.moe_num_experts):
                    used |= _check_linear(src, name.format(e=e), {k: v[e] for k, v in lin.items()})
            else:
                used |= _check_linear(src, name, lin)
    assert set(src) - used == {n for n in src if "mtp" in n}


@pytest.mark.parametrize("flavour", ["w4w2_bf16", "w4w2_u16", "plain"])
def test_converted_equals_source(ckpts, converted, flavour):
    path, summary = converted[flavour]
    cfg, params, meta = checkpoint.load_params(path)
    assert meta["k_order"] == "natural" and meta["source_format"].startswith("paddle-")
    checkpoint.check_part(cfg, "embed", params["embed"])
    check_against_paddle(cfg, params, read_all(ckpts[flavour]))
    assert summary.tensors_read == len(read_all(ckpts[flavour])) - (
        2 if flavour == "w4w2_bf16" else 0)
    assert summary.unfused_mismatches == 0  # random_params uses dyadic code scales


def test_w4w2_formats_per_layer(converted, tiny_cfg):
    """FastDeploy's rule: MoE layers <= quant_end_layer WINT4, later WINT2, the rest WINT8."""
    cfg, params, _ = checkpoint.load_params(converted["w4w2_bf16"][0])
    assert cfg == tiny_cfg
    fmts = [linear_format(params["layers"][i]["mlp"]["experts"]["up_gate"])
            for i in cfg.moe_layers]
    assert fmts == ["wint4", "wint2", "wint2"]
    assert {linear_format(lin) for layer in params["layers"] for p, lin in _linears(layer)
            if "experts" not in p} == {"wint8"}


def test_bf16_and_u16_headers_give_identical_trees(converted):
    _, a, _ = checkpoint.load_params(converted["w4w2_bf16"][0])
    _, b, _ = checkpoint.load_params(converted["w4w2_u16"][0])
    import jax
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(
        x.view(np.uint8), y.view(np.uint8)), a, b)
    assert all(jax.tree.leaves(same))


def test_load_checkpoint_source_equals_converted(ckpts, converted):
    import jax
    cfg1, src_tree, meta1 = converters.load_checkpoint(ckpts["w4w2_u16"])
    cfg2, conv_tree, meta2 = converters.load_checkpoint(converted["w4w2_u16"][0],
                                                        k_order="shuffled")
    assert cfg1 == cfg2 and meta1["k_order"] == "natural" and meta2["k_order"] == "shuffled"
    assert meta1["source_format"] == "paddle-quantized"
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
        x.view(np.uint8), y.view(np.uint8)), src_tree, conv_tree)
    assert all(jax.tree.leaves(same))


def test_iter_checkpoint_streams_parts_in_order(ckpts, tiny_cfg):
    cfg, meta, parts = converters.iter_checkpoint(ckpts["w4w2_bf16"])
    names = []
    for name, sub in parts:
        names.append(name)
        checkpoint.check_part(cfg, name, sub)
    assert names == checkpoint.part_names(tiny_cfg)


def test_metadata_and_copied_files(converted, ckpts):
    path, summary = converted["w4w2_bf16"]
    meta = checkpoint.read_meta(path)
    assert meta["format_version"] == 2 and meta["source"] == str(ckpts["w4w2_bf16"].absolute())
    assert (path / "config.json").read_bytes() == (ckpts["w4w2_bf16"] / "config.json").read_bytes()
    for f in ("generation_config.json", "tokenizer.model", "tokenizer_config.json"):
        assert (path / f).read_bytes() == (ckpts["w4w2_bf16"] / f).read_bytes(), f
    assert sorted(summary.copied_files) == sorted(
        ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json"])
    assert len(summary.skipped) == 2 and summary.unknown == []
    assert summary.bytes_read > 0 and summary.parts == 7
