"""The MoE block (router + sort-by-expert dispatch + grouped matmuls) against slow loops, and
quantized layers against the same model holding the dequantized weights in bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_params
from flax import nnx

import pallas_kernels
from jaxwint2 import ErnieConfig, ErnieForCausalLM, QuantConfig, WeightFormat, layout
from jaxwint2.moe import MoE, route


def _loop_route(x, w, bias, k):
    """FastDeploy routing per token in float64: select on p + bias, weigh by unbiased p."""
    logits = x.astype(np.float64) @ w.astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = [sorted(range(p.shape[1]), key=lambda e, i=i: (-(p[i, e] + bias[e]), e))[:k]
           for i in range(len(p))]
    weights = [p[i, ids[i]] / max(p[i, ids[i]].sum(), 1e-12) for i in range(len(p))]
    return np.array(weights), np.array(ids)


def test_route_matches_loop_with_large_correction_bias():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    w = (rng.standard_normal((32, 16)) * 0.3).astype(np.float32)
    bias = (30 + rng.uniform(-0.05, 0.05, 16)).astype(np.float32)
    weights, ids = route(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), 4)
    want_w, want_ids = _loop_route(x, w, bias, 4)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(weights), want_w, rtol=1e-5)
    # The bias decides the selection, the weights ignore it: not the top-4 of p alone.
    assert (np.sort(np.asarray(ids), -1) != np.sort(np.argsort(-(x @ w), -1)[:, :4], -1)).any()


def test_route_ties_go_to_lower_expert_id():
    x = jnp.ones((3, 8), jnp.float32)
    w = jnp.zeros((8, 6), jnp.float32)  # uniform p
    bias = jnp.array([0.0, 0.0, 1.0, 0.0, 1.0, 1.0], jnp.float32)
    weights, ids = route(x, w, bias, 2)
    assert np.asarray(ids).tolist() == [[2, 4]] * 3
    np.testing.assert_allclose(np.asarray(weights), 0.5)


def _dense(w, fmt, k_order="natural"):
    return np.asarray(pallas_kernels.dequantize(w, fmt, k_order=k_order, dtype=jnp.float32),
                      np.float64)


@pytest.mark.parametrize("expert_fmt, k_order", [("wint2", "natural"), ("wint2", "shuffled"),
                                                 ("wint4", "natural"), ("bf16", "natural")])
def test_moe_layer_matches_loop_reference(expert_fmt, k_order):
    """Uneven groups, empty experts, shared expert; dispatch never computes all experts.

    ``k_order="shuffled"`` checks that the checkpoint's WINT2 K order reaches the experts.
    """
    cfg = ErnieConfig.tiny(QuantConfig(dense="wint8", moe=expert_fmt), num_hidden_layers=2,
                           moe_layer_end_index=1, moe_num_experts=8, moe_k=3)
    mlp = make_params(cfg, seed=2)["layers"][1]["mlp"]
    moe = MoE(mlp, k=cfg.moe_k, expert_fmt=WeightFormat(expert_fmt, "reference", k_order),
              dense_fmt=WeightFormat("wint8", "reference"))
    x = np.random.default_rng(3).standard_normal((1, 5, cfg.hidden_size)).astype(np.float32)
    graphdef, state = nnx.split(moe)
    got = np.asarray(jax.jit(lambda st, v: nnx.merge(graphdef, st)(v))(state, x))[0]

    up = _dense(mlp["experts"]["up_gate"], expert_fmt, k_order)
    down = _dense(mlp["experts"]["down"], expert_fmt, k_order)
    su, sd = _dense(mlp["shared"]["up_gate"], "wint8"), _dense(mlp["shared"]["down"], "wint8")

    def swiglu(v, a, b):
        h = v @ a
        n = h.shape[-1] // 2
        return (h[..., :n] / (1 + np.exp(-h[..., :n])) * h[..., n:]) @ b

    weights, ids = _loop_route(x[0], mlp["router"]["weight"], mlp["router"]["bias"], cfg.moe_k)
    assert len(set(ids.ravel())) < cfg.moe_num_experts  # some experts get no token
    want = swiglu(x[0].astype(np.float64), su, sd)
    for t in range(5):
        for e, we in zip(ids[t], weights[t], strict=True):
            want[t] += we * swiglu(x[0, t].astype(np.float64), up[e], down[e])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _dequantized_tree(cfg, params):
    """The same weights as bf16 ``weight`` leaves (lossless: the decode is bf16-exact)."""
    def lin(w):
        fmt = layout.linear_format(w)
        return {"weight": np.asarray(pallas_kernels.dequantize(
            {k: jnp.asarray(v) for k, v in w.items()}, fmt))}

    layers = []
    for i, lp in enumerate(params["layers"]):
        mlp = lp["mlp"]
        if cfg.is_moe_layer(i):
            new_mlp = {"router": mlp["router"],
                       "experts": {k: lin(v) for k, v in mlp["experts"].items()}}
            if "shared" in mlp:
                new_mlp["shared"] = {k: lin(v) for k, v in mlp["shared"].items()}
        else:
            new_mlp = {k: lin(v) for k, v in mlp.items()}
        layers.append({**lp, "attn": {k: lin(v) for k, v in lp["attn"].items()},
                       "mlp": new_mlp})
    return {**params, "layers": layers}


def test_quantized_model_equals_bf16_model_on_dequantized_weights(tiny_cfg, tiny_params):
    ids = np.random.default_rng(4).integers(0, tiny_cfg.vocab_size, (2, 8))
    quantized = ErnieForCausalLM.from_params(tiny_cfg, tiny_params, kernels="reference")
    bf16_cfg = tiny_cfg.replace(quant=QuantConfig())
    plain = ErnieForCausalLM.from_params(bf16_cfg, _dequantized_tree(tiny_cfg, tiny_params),
                                         kernels="reference")
    a, b = np.asarray(quantized(ids)), np.asarray(plain(ids))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * np.abs(b).max())
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.98
