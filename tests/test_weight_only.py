"""Paddle weight_quantize int8/int4 layouts against PaddlePaddle's golden output."""

import ml_dtypes
import numpy as np
import pytest

import converters

CASES = ["k256_n128", "k512_n64", "k128_n256"]


@pytest.fixture(scope="module")
def golden(data_dir):
    return np.load(data_dir / "paddle_weight_only_golden.npz")


@pytest.mark.parametrize("bits,max_rel", [(8, 0.012), (4, 0.16)])
@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_source_weights(golden, case, bits, max_rel):
    w = golden[f"{case}/weight_bf16bits"].view(ml_dtypes.bfloat16).astype(np.float32)
    qw = golden[f"{case}/int{bits}/quant_weight"]
    ws = golden[f"{case}/int{bits}/weight_scale_bf16bits"]
    deq = np.asarray(converters.dequantize_weight_only(qw, ws, bits=bits)).astype(np.float32)
    assert deq.shape == w.shape
    rel = np.linalg.norm(deq - w) / np.linalg.norm(w)
    assert rel < max_rel, rel  # a wrong placement gives ~1.4
    # per element: within half a quantization step (+ Paddle's one-step rounding slack)
    scale = ws.view(ml_dtypes.bfloat16).astype(np.float32)
    assert (np.abs(deq - w) <= 1.01 * scale[None, :]).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("case", CASES)
def test_pack_is_exact_inverse_and_requantize_agrees(golden, case, bits):
    qw = golden[f"{case}/int{bits}/quant_weight"]
    q = converters.unpack_weight_only(qw, bits=bits)
    np.testing.assert_array_equal(converters.pack_weight_only(q, bits=bits), qw)
    w = golden[f"{case}/weight_bf16bits"].view(ml_dtypes.bfloat16).astype(np.float32)
    qw2, ws2 = converters.quantize_weight_only(w, bits=bits)
    np.testing.assert_array_equal(ws2.view(np.uint16),
                                  golden[f"{case}/int{bits}/weight_scale_bf16bits"])
    agree = (converters.unpack_weight_only(qw2, bits=bits) == q).mean()
    assert agree > 0.99
