"""``kernels="pallas"`` (interpret mode on CPU) against ``kernels="reference"`` for the model.

The smallest config that still reaches both kernel paths: a WINT8 dense layer (quant_matmul)
and a WINT2 MoE layer (quant_grouped_matmul with the SwiGLU and row-scale epilogues). The
kernels' own exactness tests live with the kernels; this checks the model's wiring.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_params

from jaxwint2 import ErnieConfig, ErnieForCausalLM, QuantConfig
from jaxwint2.formats import WeightFormat, implementation_for

CFG = ErnieConfig.tiny(QuantConfig(dense="wint8", moe="wint2"), num_hidden_layers=2,
                       moe_layer_end_index=1)


def test_kernels_switch_maps_to_implementations():
    assert [implementation_for(k) for k in ("pallas", "reference", "auto")] == [
        "pallas", "xla", None]
    # "auto" keeps fp32 activations on the exact path; naming "pallas" always means the kernels.
    f32, b16 = jnp.zeros((1, 64), jnp.float32), jnp.zeros((1, 64), jnp.bfloat16)
    assert WeightFormat("wint2").implementation_for_input(f32) == "xla"
    assert WeightFormat("wint2").implementation_for_input(b16) is None
    assert WeightFormat("wint2", "pallas").implementation_for_input(f32) == "pallas"
    with pytest.raises(ValueError, match="kernels"):
        WeightFormat("wint2", kernels="triton")
    with pytest.raises(ValueError, match="k_order"):
        WeightFormat("wint2", k_order="random")


@pytest.mark.slow
def test_pallas_interpret_matches_reference():
    params = make_params(CFG, seed=4)
    ids = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 8))
    ref = np.asarray(ErnieForCausalLM.from_params(CFG, params, kernels="reference")(ids))
    try:
        got = np.asarray(ErnieForCausalLM.from_params(CFG, params, kernels="pallas")(ids))
    except NotImplementedError as e:  # a shape the kernels do not take must say so loudly
        pytest.fail(f"kernels='pallas' refused the tiny model: {e}")
    rel_l2 = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all() and rel_l2 <= 2e-2, f"rel L2 {rel_l2:.2e}"
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) >= 0.85


def test_decode_step_with_paged_attention_kernel_matches_reference():
    """A paged decode step through the Pallas kernels (paged attention included) equals the
    reference path's step, rows of different context lengths, one of them padding."""
    cfg = CFG
    params = make_params(cfg, seed=5)
    outs = []
    for kernels in ("reference", "pallas"):
        model = ErnieForCausalLM.from_params(cfg, params, kernels=kernels)
        cache = model.init_cache(num_blocks=12, block_size=16)
        tables = jnp.asarray([[0, 1, 2], [3, 4, 5], [6, 7, 8]], jnp.int32)
        prompt = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 40)))
        pos = jnp.where(jnp.arange(40)[None] < jnp.asarray([[40], [17], [0]]),
                        jnp.arange(40)[None], -1)
        _, cache = model.step(prompt, pos, tables, cache)
        last = jnp.asarray([[40], [17], [-1]], jnp.int32)
        logits, _ = model.step(jnp.asarray([[5], [6], [7]]), last, tables, cache)
        outs.append(np.asarray(logits)[:2])  # row 2 is padding
    rel_l2 = np.linalg.norm(outs[1] - outs[0]) / np.linalg.norm(outs[0])
    assert np.isfinite(outs[1]).all() and rel_l2 <= 2e-2, f"rel L2 {rel_l2:.2e}"


@pytest.mark.gpu
def test_mosaic_expert_kernel_in_the_model_matches_reference():
    """On a Hopper GPU, experts whose shapes fit the Mosaic WINT2 kernel (K % 256, N % 64) are
    re-ordered into fragment byte order at build and run through it; the model still matches
    the reference path (prefill and a paged decode step)."""
    import pallas_kernels

    if not pallas_kernels.fragments_available():
        pytest.skip("the Mosaic WINT2 kernel needs a Hopper GPU")
    cfg = ErnieConfig.tiny(QuantConfig(dense="wint8", moe="wint2"), hidden_size=256,
                           moe_intermediate_size=256, num_hidden_layers=3,
                           moe_layer_end_index=2, moe_k=4)
    params = make_params(cfg, seed=6)
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 24))
    ref = np.asarray(ErnieForCausalLM.from_params(cfg, params, kernels="reference")(ids))
    model = ErnieForCausalLM.from_params(cfg, params, kernels="auto")
    orders = {s.layer.mlp.up_gate.fmt.byte_order for s in model.stacks
              if hasattr(s.layer.mlp, "router_weight")}
    assert orders == {"fragments"}, orders
    got = np.asarray(model(ids))
    rel_l2 = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.isfinite(got).all() and rel_l2 <= 2e-2, f"rel L2 {rel_l2:.2e}"


@pytest.mark.gpu
def test_converted_checkpoint_runs_the_mosaic_kernel_on_its_stored_codes(tmp_path, monkeypatch,
                                                                       data_dir):
    """A converted checkpoint stores ``code_a`` / ``code_b`` (format 2): ``jaxwint2.load`` hands
    them to the Mosaic kernel with no fit, and the model matches the reference path. The WINT2
    columns have arbitrary fp32 code scales plus the golden file's one column without an integer
    step, so warps of both code steps run."""
    import converters
    import jaxwint2
    import pallas_kernels
    from jaxwint2 import layout
    from pallas_kernels import kernel_mosaic, wint2

    if not pallas_kernels.fragments_available():
        pytest.skip("the Mosaic WINT2 kernel needs a Hopper GPU")
    cfg = ErnieConfig.tiny(QuantConfig(dense="wint8", moe="wint2"), hidden_size=256,
                           moe_intermediate_size=256, num_hidden_layers=3,
                           moe_layer_end_index=2, moe_k=4)
    golden = np.load(data_dir / "wint2_golden.npz")
    cs_all, zp_all = (np.concatenate([golden[f"{c}/{f}"].reshape(-1) for c in
                                      ("k128_n256", "k256_n128", "k320_n64", "k512_n192")])
                      for f in ("code_scale", "code_zp"))
    odd = np.flatnonzero(~wint2.affine_codes(cs_all, zp_all)[2])
    assert odd.size == 1
    rng = np.random.default_rng(8)
    params = make_params(cfg, seed=7)
    layers = []
    for i, layer in enumerate(params["layers"]):
        if cfg.is_moe_layer(i):
            experts = {}
            for proj, lin in layer["mlp"]["experts"].items():
                shape = np.shape(lin["code_scale"])
                cs = rng.uniform(100, 125, shape).astype(np.float32)
                zp = (rng.uniform(0, 1, shape) * (32767 - 255 * cs)).astype(np.float32)
                cs[1, 35], zp[1, 35] = cs_all[odd[0]], zp_all[odd[0]]  # warp 2 of expert 1
                experts[proj] = {**layout.without_integer_codes(lin), "code_scale": cs,
                                 "code_zp": zp}
            layer = {**layer, "mlp": {**layer["mlp"], "experts": experts}}
        layers.append(layer)
    src = converters.write_paddle_checkpoint(cfg, {**params, "layers": layers}, tmp_path / "src",
                                             num_shards=1)
    converters.convert_checkpoint(src, tmp_path / "dst", progress=False)

    def no_fit(w):
        raise AssertionError("the stored code_a / code_b were fitted again at load")

    monkeypatch.setattr(kernel_mosaic, "integer_codes", no_fit)
    model = jaxwint2.load(tmp_path / "dst", kernels="auto")
    orders = {s.layer.mlp.up_gate.fmt.byte_order for s in model.stacks
              if hasattr(s.layer.mlp, "router_weight")}
    assert orders == {"fragments"}, orders
    ref = jaxwint2.load(tmp_path / "dst", kernels="reference")
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 24))
    got, want = np.asarray(model(ids)), np.asarray(ref(ids))
    rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert np.isfinite(got).all() and rel_l2 <= 2e-2, f"rel L2 {rel_l2:.2e}"
