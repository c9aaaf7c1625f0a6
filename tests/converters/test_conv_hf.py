"""HF ``-PT`` checkpoints saved by ``transformers.save_pretrained`` -> runtime tree: transposes and
fusions checked against the torch state dict of the saved model."""

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conv_sources import f32, read_all

import converters
from jaxwint2 import checkpoint


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


@pytest.fixture(scope="module", params=["untied", "tied"])
def case(request, hf_ckpts, tmp_path_factory):
    src = hf_ckpts[request.param]
    dst = tmp_path_factory.mktemp("hfconv") / request.param
    converters.convert_checkpoint(src, dst, progress=False)
    model = transformers.Ernie4_5_MoeForCausalLM.from_pretrained(src, dtype="auto")
    return src, dst, {k: _np(v.detach()) for k, v in model.state_dict().items()}


def test_hf_converted_equals_state_dict(case):
    _, dst, sd = case
    cfg, p, meta = checkpoint.load_params(dst)
    assert meta["source_format"] == "hf-bf16"
    np.testing.assert_array_equal(p["embed"]["weight"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(p["final_norm"]["weight"], f32(sd["model.norm.weight"]))
    if cfg.tie_word_embeddings:
        assert "lm_head" not in p
    else:
        np.testing.assert_array_equal(p["lm_head"]["weight"], sd["lm_head.weight"].T)
    for i, layer in enumerate(p["layers"]):
        pre = f"model.layers.{i}."
        qkv = np.concatenate([sd[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"], axis=0).T
        np.testing.assert_array_equal(layer["attn"]["qkv"]["weight"], qkv)
        np.testing.assert_array_equal(layer["attn"]["o"]["weight"],
                                      sd[pre + "self_attn.o_proj.weight"].T)
        for norm, name in [("input_norm", "input_layernorm"),
                           ("post_attention_norm", "post_attention_layernorm")]:
            np.testing.assert_array_equal(layer[norm]["weight"],
                                          f32(sd[f"{pre}{name}.weight"]))
        mlp = layer["mlp"]
        if not cfg.is_moe_layer(i):
            ug = np.concatenate([sd[pre + "mlp.gate_proj.weight"],
                                 sd[pre + "mlp.up_proj.weight"]]).T
            np.testing.assert_array_equal(mlp["up_gate"]["weight"], ug)
            np.testing.assert_array_equal(mlp["down"]["weight"], sd[pre + "mlp.down_proj.weight"].T)
            continue
        # the in-memory HF module fuses experts as gate_up_proj [E, 2I, H] = [gate | up]
        np.testing.assert_array_equal(mlp["experts"]["up_gate"]["weight"],
                                      sd[pre + "mlp.experts.gate_up_proj"].transpose(0, 2, 1))
        np.testing.assert_array_equal(mlp["experts"]["down"]["weight"],
                                      sd[pre + "mlp.experts.down_proj"].transpose(0, 2, 1))
        assert mlp["router"]["weight"].dtype == np.float32
        np.testing.assert_array_equal(mlp["router"]["weight"], sd[pre + "mlp.gate.weight"].T)
        bias = sd[pre + "mlp.gate.moe_statics.e_score_correction_bias"].reshape(-1)
        np.testing.assert_array_equal(mlp["router"]["bias"], bias)
        assert bias.min() > 29.9 and bias.max() < 30.1 and bias.std() > 0.01  # spread survives
        if cfg.moe_num_shared_experts:
            sh = mlp["shared"]
            ug = np.concatenate([sd[pre + "mlp.shared_experts.gate_proj.weight"],
                                 sd[pre + "mlp.shared_experts.up_proj.weight"]]).T
            np.testing.assert_array_equal(sh["up_gate"]["weight"], ug)
            np.testing.assert_array_equal(sh["down"]["weight"],
                                          sd[pre + "mlp.shared_experts.down_proj.weight"].T)
        else:
            assert "shared" not in mlp


def test_hf_source_load_equals_converted(case):
    import jax
    src, dst, _ = case
    _, a, _ = converters.load_checkpoint(src)
    _, b, _ = converters.load_checkpoint(dst)
    same = jax.tree.map(lambda x, y: x.dtype == y.dtype and np.array_equal(
        x.view(np.uint8), y.view(np.uint8)), a, b)
    assert all(jax.tree.leaves(same))


def test_hf_float32_checkpoint_is_rounded_to_bf16_and_reported(tmp_path):
    from jaxwint2.testing import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "f32", seed=3, dtype="float32", num_hidden_layers=2)
    s = converters.convert_checkpoint(tmp_path / "f32", tmp_path / "out", progress=False)
    assert "model.layers.0.self_attn.q_proj.weight" in s.rounded
    assert not any("norm" in n or "mlp.gate.weight" in n for n in s.rounded)  # f32 leaves
    sd = read_all(tmp_path / "f32")
    _, p, _ = checkpoint.load_params(tmp_path / "out")
    np.testing.assert_array_equal(
        p["layers"][1]["mlp"]["experts"]["down"]["weight"][3],
        sd["model.layers.1.mlp.experts.3.down_proj.weight"].T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(p["layers"][1]["mlp"]["router"]["weight"],
                                  sd["model.layers.1.mlp.gate.weight"].T)
