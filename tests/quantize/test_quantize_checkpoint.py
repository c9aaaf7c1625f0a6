"""``python -m jaxwint2.quantize``: a tiny bf16 HF / Paddle checkpoint -> FastDeploy w4w2 files."""

import json
import pathlib

import numpy as np
import pytest

import converters
import jaxwint2
from converters import quantizer
from converters.encode_gptq import hessian_from_activations
from converters.quantizer import LinearReport, quantize_linear, quantize_part
from converters.safetensors_io import SafetensorsFile
from jaxwint2 import QuantConfig
from jaxwint2.quantize import main
from jaxwint2.testing import write_hf_checkpoint
from pallas_kernels import count_unfused_mismatches, dequantize_wint2, kernel_mosaic
from pallas_kernels.reference import dequantize

# 3 layers: 0 dense, 1 MoE with WINT4 experts, 2 MoE with WINT2 experts (K = 128 and 64)
TINY = dict(num_hidden_layers=3, moe_layer_end_index=2, moe_num_experts=4,
            moe_intermediate_size=64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    write_hf_checkpoint(root / "hf", seed=3, **TINY)
    (root / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    assert main([str(root / "hf"), str(root / "q"), "--w4-end-layer", "1", "--effort", "fast",
                 "--no-progress"]) == 0
    return root


def _headers(d: pathlib.Path) -> dict:
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        st = SafetensorsFile(d / f)
        out.update({k: (st.info(k).dtype, tuple(st.info(k).shape)) for k in st.keys()})  # noqa: SIM118
    assert set(out) == set(index)
    return out


def test_names_dtypes_shapes_and_config(ckpts):
    q = ckpts / "q"
    cfg = json.loads((q / "config.json").read_text())
    assert cfg["quantization_config"] == QuantConfig(dense="wint8", moe="wint2",
                                                     w4_end_layer=1).to_dict()
    assert cfg["quantization_config"]["moe_quant_type"] == "w4w2"
    assert (q / "tokenizer_config.json").is_file() and (q / "generation_config.json").is_file()
    h = _headers(q)
    w2 = "ernie.layers.2.mlp.experts.3.down_proj."  # K = 64, N = 128
    assert h[w2 + "quant_weight"] == ("U8", (16, 128))
    assert h[w2 + "weight_scale"] == ("U8", (1, 128))
    assert h[w2 + "super_scales"] == ("BF16", (128,))
    assert h[w2 + "code_scale"] == ("F32", (128,)) and h[w2 + "code_zp"] == ("F32", (128,))
    w4 = "ernie.layers.1.mlp.experts.0.up_gate_proj."  # K = 128, N = 128: int4 [N/2, K]
    assert h[w4 + "quant_weight"] == ("I8", (64, 128))
    assert h[w4 + "weight_scale"] == ("BF16", (128,))
    w8 = "ernie.layers.0.self_attn.qkv_proj."  # K = 128, N = 256: int8 [N, K]
    assert h[w8 + "quant_weight"] == ("I8", (256, 128))
    assert h[w8 + "weight_scale"] == ("BF16", (256,))
    assert h["ernie.layers.2.mlp.shared_experts.down_proj.quant_weight"][0] == "I8"
    assert h["ernie.layers.2.mlp.gate.weight"] == ("F32", (128, 4))
    assert not any(k.endswith(".weight") and "proj" in k for k in h), "unquantized linear left"
    assert not any(k.endswith((".code_a", ".code_b")) for k in h), "not a Paddle tensor"


def test_loaders_accept_output_and_errors_are_per_format(ckpts, tmp_path):
    cfg_q, params_q, _ = converters.load_checkpoint(ckpts / "q")
    cfg_s, params_s, _ = converters.load_checkpoint(ckpts / "hf")
    assert cfg_q.expert_format(1) == "wint4" and cfg_q.expert_format(2) == "wint2"
    errs = {}
    for i in (0, 1, 2):
        for fmt, src, dst in [
            ("wint8", params_s["layers"][i]["attn"]["qkv"],
             params_q["layers"][i]["attn"]["qkv"]),
            *([(cfg_q.expert_format(i), params_s["layers"][i]["mlp"]["experts"]["down"],
                params_q["layers"][i]["mlp"]["experts"]["down"])] if i else [])]:
            w = np.asarray(src["weight"], np.float32)
            wh = np.asarray(dequantize(dst, fmt, dtype=np.float32))
            errs[fmt] = ((w - wh) ** 2).sum() / (w * w).sum()
    assert errs["wint8"] < 1e-3 and errs["wint4"] < 0.03 and errs["wint2"] < 0.13, errs
    w2 = params_q["layers"][2]["mlp"]["experts"]["down"]
    assert count_unfused_mismatches(w2["code_scale"], w2["code_zp"]) == 0
    exact = dequantize_wint2(*(w2[k][1] for k in ("quant_weight", "weight_scale", "super_scales",
                                                   "code_scale", "code_zp")))
    np.testing.assert_array_equal(np.asarray(exact, np.float32), np.asarray(
        dequantize({k: v[1] for k, v in w2.items()}, "wint2", dtype=np.float32)))
    summary = converters.convert_checkpoint(ckpts / "q", tmp_path / "conv", progress=False)
    assert summary.unfused_mismatches == 0 and summary.parts == 6


def test_jaxwint2_load_runs_quantized_model(ckpts):
    ref = jaxwint2.load(str(ckpts / "hf"), kernels="reference", dtype="float32")
    quant = jaxwint2.load(str(ckpts / "q"), kernels="reference", dtype="float32")
    tokens = np.random.default_rng(0).integers(3, 512, (2, 16))
    a, b = np.asarray(ref(tokens)), np.asarray(quant(tokens))
    assert np.isfinite(b).all()
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.5, rel


def test_paddle_source_gives_identical_bytes(ckpts):
    cfg, params, _ = converters.load_checkpoint(ckpts / "hf")
    converters.write_paddle_checkpoint(cfg, params, ckpts / "paddle", bf16_header="U16")
    assert main([str(ckpts / "paddle"), str(ckpts / "q_paddle"), "--w4-end-layer", "1",
                 "--effort", "fast", "--no-progress"]) == 0
    a, b = converters.load_checkpoint(ckpts / "q")[1], converters.load_checkpoint(
        ckpts / "q_paddle")[1]
    for x, y in zip(_flat(a), _flat(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _flat(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _flat(tree[k])
    elif isinstance(tree, list):
        for v in tree:
            yield from _flat(v)
    else:
        yield tree


def test_calibration_hessian_is_used(ckpts):
    cfg, meta, parts = converters.iter_checkpoint(ckpts / "hf")
    sub = dict(parts)["layers/2"]
    qcfg = cfg.replace(quant=QuantConfig(dense="wint8", moe="wint2", w4_end_layer=1))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 64)) * np.linspace(0.1, 3, 64)  # uneven input scales
    h = {"layers/2/mlp/experts/down": hessian_from_activations(x).astype(np.float32)}
    reports: list[LinearReport] = []
    cal = quantize_part(qcfg, "layers/2", sub, hessians=h, effort="fast", reports=reports)
    plain = quantize_part(qcfg, "layers/2", sub, effort="fast")
    assert [r.calibrated for r in reports if r.fmt == "wint2"] == [False, True]
    down_c, down_p = cal["mlp"]["experts"]["down"], plain["mlp"]["experts"]["down"]
    w = np.asarray(sub["mlp"]["experts"]["down"]["weight"], np.float32)

    def out_err(lin):
        wh = np.asarray(dequantize(lin, "wint2", dtype=np.float32))
        return np.linalg.norm(x @ (w - wh)) / np.linalg.norm(x @ w)

    assert out_err(down_c) < out_err(down_p)
    # the runtime layout in full: the integer code step's leaves, every encoder column exact
    a, b = kernel_mosaic.fit_integer_codes(down_c["code_scale"], down_c["code_zp"])
    np.testing.assert_array_equal(down_c["code_a"], a)
    np.testing.assert_array_equal(down_c["code_b"], b)
    assert (a != 0).all()


def test_cli_errors_leave_nothing_behind(ckpts, tmp_path, capsys):
    assert main([str(ckpts / "hf"), str(ckpts / "q"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([str(ckpts / "q"), str(tmp_path / "again"), "--no-progress"]) == 2
    assert "already quantized" in capsys.readouterr().err
    bad = tmp_path / "calib.npz"
    np.savez(bad, **{"layers.0.attn.qkv": np.eye(128, dtype=np.float32)})
    assert main([str(ckpts / "hf"), str(tmp_path / "out"), "--w4-end-layer", "1",
                 "--calibration", str(bad), "--no-progress"]) == 2
    assert "not a WINT2 linear" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_stacked_experts_encode_like_single_experts(monkeypatch):
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((3, 64, 32)) * 0.02).astype(np.float32)
    whole = quantize_linear(w, "wint2", effort="fast")
    monkeypatch.setattr(quantizer, "MAX_ENCODE_WEIGHTS", 2 * 64 * 32)  # batches 2 + 1
    batched = quantize_linear(w, "wint2", effort="fast")
    single = converters.encode_wint2(w[2], effort="fast")
    for key in whole:
        np.testing.assert_array_equal(whole[key], batched[key])
        np.testing.assert_array_equal(whole[key][2], np.asarray(single[key]).astype(
            whole[key].dtype))
    assert whole["super_scales"].dtype == np.float32  # runtime layout widens bf16
