"""Which sizes split, the per-rank config, the PartitionSpec rules and the convert CLI flag: no
devices needed (shapes, host NumPy and the CLI)."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import converters
from jaxwint2 import checkpoint, layout, parallel
from jaxwint2.config import ErnieConfig
from jaxwint2.convert import main as convert_main
from jaxwint2.testing import random_params


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_tp_300b_splits_up_to_8(tp):
    cfg = ErnieConfig.ernie45_300b_a47b()
    loc = parallel.local_config(cfg, tp)
    assert loc.num_attention_heads == 64 // tp
    assert loc.num_key_value_heads == 8 // tp
    assert loc.moe_intermediate_size == 3584 // tp
    assert loc.vocab_size == 103424 // tp


def test_tp_size_errors_name_the_dimension():
    with pytest.raises(ValueError, match="WINT2 group size 64"):  # 3584 / 16 = 224 rows
        parallel.check_tensor_parallel(ErnieConfig.ernie45_300b_a47b(), 16)
    with pytest.raises(ValueError, match="attention heads 20"):
        parallel.check_tensor_parallel(ErnieConfig.ernie45_21b_a3b(), 8)
    with pytest.raises(ValueError, match=">= 1"):
        parallel.check_tensor_parallel(ErnieConfig.tiny(), 0)


def test_tp_kv_heads_replicated_when_fewer_than_ranks():
    cfg = ErnieConfig.ernie45_21b_a3b()  # 4 kv heads
    assert parallel.local_config(cfg, 4).num_key_value_heads == 1
    cfg = ErnieConfig.tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                           moe_intermediate_size=512)
    assert parallel.local_config(cfg, 8).num_key_value_heads == 1  # each head on 4 ranks


def test_tp_leaf_specs():
    cfg = ErnieConfig.ernie45_300b_a47b()
    specs = {p: parallel.part_specs(p, checkpoint.part_shapes(cfg, p))
             for p in ("embed", "lm_head", "final_norm", "layers/0", "layers/10")}
    assert specs["embed"]["weight"] == P("tp", None)
    assert specs["lm_head"]["weight"] == P(None, "tp")
    assert specs["final_norm"]["weight"] == P()
    dense, moe = specs["layers/0"], specs["layers/10"]
    assert dense["input_norm"]["weight"] == P()
    assert dense["attn"]["qkv"] == {"quant_weight": P(None, "tp"), "weight_scale": P("tp")}
    assert dense["attn"]["o"] == {"quant_weight": P("tp", None), "weight_scale": P()}
    assert dense["mlp"]["up_gate"]["quant_weight"] == P(None, "tp")
    assert moe["mlp"]["router"] == {"weight": P(), "bias": P()}
    assert moe["mlp"]["experts"]["up_gate"]["code_scale"] == P(None, "tp")
    assert moe["mlp"]["experts"]["down"] == {
        "quant_weight": P(None, "tp", None), "weight_scale": P(None, "tp", None),
        "super_scales": P(), "code_scale": P(), "code_zp": P(), "code_a": P(), "code_b": P()}
    assert moe["mlp"]["experts"]["up_gate"]["code_a"] == P(None, "tp")


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_specs_agree_with_split_tp(tp):
    """A replicated spec <=> every rank's slice is the whole leaf; a sharded axis <=> the rank
    slices differ only along it (and the local config's layout is each rank's shapes)."""
    cfg = ErnieConfig.tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                           moe_intermediate_size=512)
    params = random_params(cfg, seed=0)
    loc = parallel.local_config(cfg, tp)
    for part in checkpoint.part_names(cfg):
        full = checkpoint.get_part(params, part)
        ranks = [converters.split_tp(cfg, part, full, r, tp) for r in range(tp)]
        checkpoint.check_part(loc, part, ranks[0])
        flat_specs = dict(layout.flatten(parallel.part_specs(part, full)))
        for path, spec in flat_specs.items():
            leaf = full
            slices = ranks
            for k in path:
                leaf, slices = leaf[k], [s[k] for s in slices]
            if spec == P():
                assert all(np.array_equal(s, leaf) for s in slices), (part, path)
            else:
                axis = list(spec).index("tp")
                assert slices[0].shape[axis] * tp >= leaf.shape[axis], (part, path)
                other = [d for i, d in enumerate(leaf.shape) if i != axis]
                assert [d for i, d in enumerate(slices[0].shape) if i != axis] == other
    assert layout.param_shapes(loc)["embed"]["weight"].shape == (cfg.vocab_size // tp, 128)


def test_tp_convert_cli_checks_the_size(tmp_path, capsys):
    cfg = ErnieConfig.tiny()  # 4 heads: TP 3 cannot split them
    src = converters.write_paddle_checkpoint(cfg, random_params(cfg, seed=0), tmp_path / "src")
    assert convert_main([str(src), str(tmp_path / "bad"), "--tensor-parallel-size", "3",
                         "--no-progress"]) == 2
    assert "--tensor-parallel-size 3" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert convert_main([str(src), str(tmp_path / "ok"), "--tensor-parallel-size", "2",
                         "--no-progress"]) == 0
    assert checkpoint.is_converted(tmp_path / "ok")
