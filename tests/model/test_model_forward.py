"""Whole-model forward: full-size configs by shape only; the tiny config vs the NumPy oracle."""

from __future__ import annotations

import ernie45_numpy
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_weights
from flax import nnx

from jaxwint2 import ErnieConfig, ErnieForCausalLM, checkpoint, layout
from jaxwint2.decoder import layer_groups
from jaxwint2.model import count_params
from pallas_kernels.numerics import assert_close


def _abstract_model(cfg):
    def build():
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), layout.param_shapes(cfg))
        return ErnieForCausalLM.from_params(cfg, zeros, kernels="reference")

    return nnx.eval_shape(build)


@pytest.mark.parametrize("preset, expected", [("ernie45_300b_a47b", 299.5e9),
                                              ("ernie45_21b_a3b", 21.8e9)])
def test_full_size_configs_by_shape(preset, expected):
    cfg = getattr(ErnieConfig, preset)()
    model = _abstract_model(cfg)
    assert abs(count_params(model) - expected) / expected < 0.01
    graphdef, state = nnx.split(model)
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    logits = jax.eval_shape(lambda st, t: nnx.merge(graphdef, st).forward(t), state, tokens)
    assert logits.shape == (2, 8, cfg.vocab_size) and logits.dtype == jnp.float32

    cache = jax.eval_shape(lambda: model.init_cache(num_blocks=4, block_size=16))
    assert cache.k.shape == (cfg.num_hidden_layers, 4, 16, cfg.num_key_value_heads, cfg.head_dim)
    last, cache2 = jax.eval_shape(
        lambda st, c: nnx.merge(graphdef, st).step(
            jnp.zeros((2, 1), jnp.int32), jnp.zeros((2, 1), jnp.int32),
            jnp.zeros((2, 4), jnp.int32), c, logits_at=jnp.zeros(2, jnp.int32)), state, cache)
    assert last.shape == (2, cfg.vocab_size) and cache2.k.shape == cache.k.shape


def test_300b_layers_scan_in_three_runs():
    groups = layer_groups(ErnieConfig.ernie45_300b_a47b())
    assert groups == [range(0, 3), range(3, 7), range(7, 54)]


def test_integer_code_leaves_are_optional_and_not_kept(tiny_cfg, tiny_params):
    """WINT2 linears of a loaded checkpoint carry code_a / code_b (jaxwint2/layout.py): the model
    takes trees with or without them, and off the Mosaic GPU kernel keeps none (nothing else
    reads them), so both build the same model; one of the pair alone is refused."""
    with_codes = checkpoint.add_integer_codes(tiny_params)
    assert "code_a" in with_codes["layers"][3]["mlp"]["experts"]["down"]
    assert "code_a" not in tiny_params["layers"][3]["mlp"]["experts"]["down"]

    def state(params):
        model = ErnieForCausalLM.from_params(tiny_cfg, params, kernels="reference")
        return {jax.tree_util.keystr(p): x for p, x in
                jax.tree_util.tree_leaves_with_path(nnx.state(model))}

    a, b = state(tiny_params), state(with_codes)
    assert a.keys() == b.keys() and not [p for p in b if "code_" in p and "code_scale" not in p
                                         and "code_zp" not in p]
    assert all(np.array_equal(a[p], b[p]) for p in a)
    layers = list(with_codes["layers"])
    down = dict(layers[3]["mlp"]["experts"]["down"])
    del down["code_b"]
    layers[3] = {**layers[3], "mlp": {**layers[3]["mlp"], "experts": {
        **layers[3]["mlp"]["experts"], "down": down}}}
    with pytest.raises(ValueError, match=r"missing 1 leaves.*\['code_b'\]"):
        ErnieForCausalLM.from_params(tiny_cfg, {**with_codes, "layers": layers},
                                     kernels="reference")


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1).integers(0, ErnieConfig.tiny().vocab_size, (2, 12))


@pytest.fixture(scope="module")
def oracle(tiny_cfg, tiny_params, ids):
    w = dense_weights(tiny_cfg, tiny_params)
    return np.stack([ernie45_numpy.forward(tiny_cfg, w, row) for row in ids])


def test_float32_matches_float64_oracle(tiny_cfg, tiny_params, ids, oracle):
    """WINT8 attention, WINT4 and WINT2 experts: fp32 differs from fp64 only by rounding."""
    model = ErnieForCausalLM.from_params(tiny_cfg, tiny_params, kernels="reference",
                                         dtype="float32")
    logits = np.asarray(model(ids))
    assert logits.dtype == np.float32 and logits.shape == (*ids.shape, tiny_cfg.vocab_size)
    assert np.abs(logits - oracle).max() <= 1e-4 * np.abs(oracle).max()


def test_bfloat16_close_to_oracle(tiny_cfg, tiny_params, ids, oracle):
    model = ErnieForCausalLM.from_params(tiny_cfg, tiny_params, kernels="reference")
    logits = np.asarray(model(ids))
    assert logits.dtype == np.float32
    assert_close(logits, oracle, rel_l2=3e-2, min_frac_close=0.95, context="bf16 logits")
    assert np.mean(logits.argmax(-1) == oracle.argmax(-1)) >= 0.9


def test_bad_inputs_name_the_parameter(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="dtype"):
        ErnieForCausalLM.from_params(tiny_cfg, tiny_params, dtype="float16")
    with pytest.raises(ValueError, match="kernels"):
        ErnieForCausalLM.from_params(tiny_cfg, tiny_params, kernels="cuda")
    bad = dict(tiny_params, final_norm={"weight": np.ones(7, np.float32)})
    with pytest.raises(ValueError, match=r"params\['final_norm'\]\['weight'\].*shape"):
        ErnieForCausalLM.from_params(tiny_cfg, bad)
    model = ErnieForCausalLM.from_params(tiny_cfg, tiny_params, kernels="reference")
    with pytest.raises(ValueError, match="token_ids"):
        model(np.zeros(5, np.int32))
    with pytest.raises(ValueError, match="token_ids"):
        model(np.zeros((1, 5), np.float32))
