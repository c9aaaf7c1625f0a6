"""FastDeploy tensor-parallel slices: split_tp / merge_tp on the runtime tree, checked against
decodes of the full tensors, and rank{r}/ checkpoints (TP2, TP4) converted back to TP1."""

import jax
import numpy as np
import pytest
from conv_sources import tp4_config

import converters
import pallas_kernels as pk
from jaxwint2 import checkpoint, layout
from jaxwint2.layout import linear_format
from jaxwint2.testing import random_params
from pallas_kernels import kernel_mosaic


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(
        lambda x, y: x.dtype == y.dtype and x.shape == y.shape and np.array_equal(
            x.view(np.uint8), y.view(np.uint8)), a, b)))


def _deq(lin):
    return np.asarray(pk.dequantize({k: np.asarray(v) for k, v in lin.items()},
                                    linear_format(lin))).astype(np.float32)


@pytest.fixture(scope="module")
def cfg4():
    return tp4_config()


@pytest.fixture(scope="module")
def params4(cfg4):
    return random_params(cfg4, seed=2)


@pytest.mark.parametrize("tp", [2, 4])
def test_merge_inverts_split_every_part(cfg4, params4, tp):
    for part in checkpoint.part_names(cfg4):
        full = checkpoint.get_part(params4, part)
        ranks = [converters.split_tp(cfg4, part, full, r, tp) for r in range(tp)]
        for r, sub in enumerate(ranks):
            checkpoint.check_part(cfg4, part, sub,
                                  expected=converters.rank_shapes(cfg4, part, r, tp))
        assert _same(converters.merge_tp(cfg4, part, ranks), full), part


@pytest.mark.parametrize("tp", [2, 4])
def test_row_split_decodes_to_row_slices(cfg4, params4, tp):
    """K splits (down, o): each rank's decode == its rows of the full decode. WINT2 down over 4
    ranks has one 64-row group per rank, so odd ranks start on a low-nibble group: the re-packed
    weight_scale must restart the parity."""
    for i in (0, 1, 2):  # dense WINT8 layer, WINT4 MoE layer, WINT2 MoE layer
        layer = params4["layers"][i]
        linears = [("attn", "o")] + ([("mlp", "experts", "down"), ("mlp", "shared", "down")]
                                     if cfg4.is_moe_layer(i) else [("mlp", "down")])
        for path in linears:
            full = layer
            for k in path:
                full = full[k]
            want = _deq(full)
            k_rows = want.shape[-2] // tp
            for r in range(tp):
                sub = converters.split_tp(cfg4, f"layers/{i}", layer, r, tp)
                for k in path:
                    sub = sub[k]
                np.testing.assert_array_equal(_deq(sub), want[..., r * k_rows:(r + 1) * k_rows, :],
                                              err_msg=f"layer {i} {path} rank {r}")


def test_wint2_parity_restart_against_exact_decode(cfg4, params4):
    down = params4["layers"][2]["mlp"]["experts"]["down"]
    assert linear_format(down) == "wint2"
    full = np.asarray(pk.dequantize_wint2(down["quant_weight"], down["weight_scale"],
                                          down["super_scales"], down["code_scale"],
                                          down["code_zp"]))
    sub = converters.split_tp(cfg4, "layers/2", params4["layers"][2], 1, 4)
    sub = sub["mlp"]["experts"]["down"]
    # rank 1 holds global group 1 (the low nibble of byte 0) as its group 0 (a high nibble)
    np.testing.assert_array_equal(sub["weight_scale"][:, 0] >> 4, down["weight_scale"][:, 0] & 0xF)
    got = np.asarray(pk.dequantize_wint2(sub["quant_weight"], sub["weight_scale"],
                                         sub["super_scales"], sub["code_scale"], sub["code_zp"]))
    np.testing.assert_array_equal(got.astype(np.float32), full[:, 64:128].astype(np.float32))


def test_column_splits_follow_heads_and_halves(cfg4, params4):
    layer = params4["layers"][0]
    qkv = _deq(layer["attn"]["qkv"])
    d, q = cfg4.head_dim, cfg4.q_size
    for r in range(4):
        sub = _deq(converters.split_tp(cfg4, "layers/0", layer, r, 4)["attn"]["qkv"])
        kv_head = r * cfg4.num_key_value_heads // 4  # 2 kv heads over 4 ranks: replicated
        want = np.concatenate([qkv[:, r * d:(r + 1) * d],
                               qkv[:, q + kv_head * d:q + (kv_head + 1) * d],
                               qkv[:, q + cfg4.kv_size + kv_head * d:
                                   q + cfg4.kv_size + (kv_head + 1) * d]], axis=1)
        np.testing.assert_array_equal(sub, want)
    ug = _deq(params4["layers"][1]["mlp"]["experts"]["up_gate"])  # WINT4 experts [E, H, 2I]
    half = ug.shape[-1] // 2
    s = half // 4
    sub = _deq(converters.split_tp(cfg4, "layers/1", params4["layers"][1], 3, 4)
               ["mlp"]["experts"]["up_gate"])
    np.testing.assert_array_equal(sub, np.concatenate(
        [ug[..., 3 * s:4 * s], ug[..., half + 3 * s:half + 4 * s]], axis=-1))


def _wint2_linears(tree, path=()):
    for k, v in tree.items():
        if isinstance(v, dict) and "code_scale" in v:
            yield (*path, k), v
        elif isinstance(v, dict):
            yield from _wint2_linears(v, (*path, k))


@pytest.mark.parametrize("tp", [2, 4])
def test_split_keeps_integer_codes_consistent(cfg4, params4, tp):
    """code_a / code_b are per column: each rank's are the fit of its own code_scale / code_zp
    (up_gate: column slices; down: replicated). A tree stored without them (a version-1
    conversion, source tensors) splits and merges without them; one of the pair alone is
    refused."""
    checked = 0
    for i in range(cfg4.num_hidden_layers):
        part, full = f"layers/{i}", params4["layers"][i]
        plain = layout.without_integer_codes(full)
        ranks = [converters.split_tp(cfg4, part, full, r, tp) for r in range(tp)]
        plain_ranks = [converters.split_tp(cfg4, part, plain, r, tp) for r in range(tp)]
        for r in range(tp):
            assert _same(plain_ranks[r], layout.without_integer_codes(ranks[r])), (part, r)
            for path, lin in _wint2_linears(ranks[r]):
                a, b = kernel_mosaic.fit_integer_codes(lin["code_scale"], lin["code_zp"])
                np.testing.assert_array_equal(lin["code_a"], a, err_msg=f"{part} {path} {r}")
                np.testing.assert_array_equal(lin["code_b"], b, err_msg=f"{part} {path} {r}")
                checked += 1
        assert _same(converters.merge_tp(cfg4, part, plain_ranks), plain), part
    assert checked == 2 * tp * sum(cfg4.expert_format(i) == "wint2" for i in cfg4.moe_layers)
    half = params4["layers"][2]
    lin = half["mlp"]["experts"]["down"]
    half = {**half, "mlp": {**half["mlp"], "experts": {
        **half["mlp"]["experts"], "down": {k: v for k, v in lin.items() if k != "code_b"}}}}
    with pytest.raises(ValueError, match="code_b"):
        converters.split_tp(cfg4, "layers/2", half, 0, tp)


def test_split_rejects_unsplittable_shapes(tiny_cfg, tiny_params):
    with pytest.raises(ValueError, match="WINT2 group size"):
        converters.split_tp(tiny_cfg, "layers/3", tiny_params["layers"][3], 0, 4)


def test_merge_rejects_disagreeing_replicas(cfg4, params4):
    ranks = [converters.split_tp(cfg4, "layers/1", params4["layers"][1], r, 2) for r in range(2)]
    ranks[1]["mlp"]["router"]["bias"] = ranks[1]["mlp"]["router"]["bias"] + 1
    with pytest.raises(ValueError, match="router/bias"):
        converters.merge_tp(cfg4, "layers/1", ranks)


@pytest.mark.parametrize("flavour,seed", [("tp2", 0), ("tp4", 2)])
def test_rank_dirs_convert_to_tp1(ckpts, tmp_path, flavour, seed):
    cfg = converters.open_checkpoint(ckpts[flavour]).config
    s = converters.convert_checkpoint(ckpts[flavour], tmp_path / "out", progress=False)
    assert s.source_format == f"paddle-quantized-{flavour}"
    got_cfg, got, meta = converters.load_checkpoint(tmp_path / "out")
    assert got_cfg == cfg and meta["source_tp_size"] == int(flavour[2:]) and meta["tp_size"] == 1
    assert _same(got, random_params(cfg, seed=seed))
