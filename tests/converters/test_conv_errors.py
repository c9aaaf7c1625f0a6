"""Bad input: ``python -m jaxwint2.convert`` exits 2 with one line naming file and tensor, and
leaves nothing at DST; --force, interrupted runs, skipped and unknown tensors."""

import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from conv_sources import read_all

import converters
from converters.safetensors_io import SafetensorsWriter
from jaxwint2 import checkpoint
from jaxwint2.convert import main


@pytest.fixture
def src(tmp_path, tiny_cfg, tiny_params) -> pathlib.Path:
    """A fresh single-file w4w2 checkpoint that a test may damage."""
    return converters.write_paddle_checkpoint(tiny_cfg, tiny_params, tmp_path / "src",
                                              num_shards=1, bf16_header="U16")


def _rewrite(path: pathlib.Path, drop=(), replace=None) -> None:
    tensors = read_all(path)
    for name in drop:
        del tensors[name]
    tensors.update(replace or {})
    with SafetensorsWriter(path / "model.safetensors", bf16_header="U16") as w:
        for name, t in tensors.items():
            w.add(name, t)


def _edit_config(path: pathlib.Path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def _fails(capsys, src, dst, *needles):
    rc = main([str(src), str(dst), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("error: ") and "\n" not in err, err
    print(err)
    for needle in needles:
        assert needle in err, (needle, err)
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]
    return err


def test_missing_tensor(src, capsys):
    name = "ernie.layers.2.mlp.experts.3.down_proj.code_zp"
    _rewrite(src, drop=[name])
    _fails(capsys, src, src.parent / "dst", "missing tensor", name, str(src))


def test_wrong_shape(src, capsys):
    name = "ernie.layers.0.self_attn.o_proj.weight_scale"
    _rewrite(src, replace={name: np.ones(64, ml_dtypes.bfloat16)})
    _fails(capsys, src, src.parent / "dst", name, "model.safetensors", "[64]", "expected")


def test_wrong_dtype(src, capsys):
    name = "ernie.layers.3.mlp.experts.0.up_gate_proj.quant_weight"
    t = read_all(src)[name]
    _rewrite(src, replace={name: t.view(np.int8)})
    _fails(capsys, src, src.parent / "dst", name, "is I8", "expected U8")


def test_truncated_file(src, capsys):
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) * 3 // 5])
    _fails(capsys, src, src.parent / "dst", "truncated", str(f), "tensor '")


def test_corrupt_header(src, capsys):
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    _fails(capsys, src, src.parent / "dst", "corrupt safetensors header", str(f))


def test_unreadable_index(tmp_path, tiny_cfg, tiny_params, capsys):
    src = converters.write_paddle_checkpoint(tiny_cfg, tiny_params, tmp_path / "src",
                                             num_shards=2)
    (src / "model.safetensors.index.json").write_text('{"weight_map": ')
    _fails(capsys, src, tmp_path / "dst", "unreadable index", "model.safetensors.index.json")


def test_index_points_to_missing_shard(tmp_path, tiny_cfg, tiny_params, capsys):
    src = converters.write_paddle_checkpoint(tiny_cfg, tiny_params, tmp_path / "src",
                                             num_shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    _fails(capsys, src, tmp_path / "dst", "missing file", "model-00002-of-00002.safetensors")


def test_config_contradicts_tensors(src, capsys):
    """quant_end_layer 0 makes MoE layer 1 WINT2 in the config; the file holds WINT4 there."""
    def w4_end_0(c):
        c["quantization_config"]["moe_quant_config"]["moe_w4_quant_config"]["quant_end_layer"] = 0
    _edit_config(src, w4_end_0)
    _fails(capsys, src, src.parent / "dst",
           "ernie.layers.1.mlp.experts.0.up_gate_proj.quant_weight", "wint2", "config.json")


def test_unquantized_config_for_quantized_tensors(src, capsys):
    _edit_config(src, lambda c: c.pop("quantization_config"))
    _fails(capsys, src, src.parent / "dst", "ernie.layers.0.self_attn.qkv_proj.quant_weight",
           "quantized")


def test_unsupported_quantization_type(src, capsys):
    _edit_config(src, lambda c: c["quantization_config"].update(moe_quant_type="wint3"))
    _fails(capsys, src, src.parent / "dst", "config.json", "moe_quant_type='wint3'")


def test_incomplete_config(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"vocab_size": 8}))
    _fails(capsys, tmp_path / "src", tmp_path / "dst", "config.json", "num_hidden_layers")


def test_no_weights(src, capsys):
    (src / "model.safetensors").unlink()
    _fails(capsys, src, src.parent / "dst", "no *.safetensors files", str(src))


def test_existing_dst_refused_then_forced(src, capsys):
    dst = src.parent / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(src), str(dst), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert main([str(src), str(dst), "--no-progress", "--force"]) == 0
    assert "converted" in capsys.readouterr().out
    assert not (dst / "keep.txt").exists() and checkpoint.is_converted(dst)
    assert [p.name for p in src.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_run_leaves_nothing(src, monkeypatch, exc):
    calls = []
    real = checkpoint.save_part

    def flaky(path, part, sub):
        calls.append(part)
        if len(calls) == 3:
            raise exc("interrupted")
        real(path, part, sub)

    monkeypatch.setattr(checkpoint, "save_part", flaky)
    dst = src.parent / "dst"
    with pytest.raises(exc):
        converters.convert_checkpoint(src, dst, progress=False)
    assert len(calls) == 3 and not dst.exists()
    assert [p.name for p in src.parent.iterdir()] == ["src"]


def test_mtp_skipped_unknown_warned(tmp_path, tiny_cfg, tiny_params):
    extra = {"ernie.mtp_linear_proj.0.weight": np.ones((4, 4), np.float32),
             "ernie.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}
    src = converters.write_paddle_checkpoint(tiny_cfg, tiny_params, tmp_path / "src",
                                             extra_tensors=extra)
    with pytest.warns(UserWarning, match=r"1 unknown tensors ignored: .*rotary\.inv_freq"):
        s = converters.convert_checkpoint(src, tmp_path / "dst", progress=False)
    assert s.skipped == ["ernie.mtp_linear_proj.0.weight"]
    assert s.unknown == ["ernie.layers.0.self_attn.rotary.inv_freq"]


def test_bad_k_order_is_a_usage_error(src, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(src), str(src.parent / "dst"), "--k-order", "diagonal"])
    assert e.value.code == 2 and not (src.parent / "dst").exists()


def test_k_order_recorded(src, tmp_path):
    assert main([str(src), str(tmp_path / "dst"), "--k-order", "shuffled", "--no-progress"]) == 0
    assert checkpoint.read_meta(tmp_path / "dst")["k_order"] == "shuffled"


def test_sigterm_mid_run_leaves_nothing(tmp_path):
    """A real child process killed with SIGTERM while converting removes its temporary dir."""
    import signal
    import subprocess
    import sys
    import time

    from converters.bench_rss import synthetic_config
    from jaxwint2.testing import random_part

    cfg = synthetic_config(int(60e6), hidden=512)
    src = converters.write_paddle_checkpoint(cfg, lambda p: random_part(cfg, p), tmp_path / "src")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-m", "jaxwint2.convert", str(src), str(dst),
                             "--no-progress"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".dst.tmp-*/params/layers/*")) and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until some layers are written
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_rank_dirs_that_disagree_on_a_replicated_tensor(ckpts, tmp_path, capsys):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(ckpts["tp2"], src)
    name = "ernie.layers.1.mlp.moe_statics.e_score_correction_bias"
    rank1 = src / "rank1"
    weight_map = json.loads((rank1 / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map[name]
    tensors = read_all(rank1)
    with SafetensorsWriter(rank1 / shard, bf16_header="U16") as w:  # rewrite that shard
        for n, t in tensors.items():
            if weight_map[n] == shard:
                w.add(n, t + 1 if n == name else t)
    _fails(capsys, src, tmp_path / "dst", "layers/1/mlp/router/bias", "ranks 0 and 1")
