"""``python -m converters.inspect`` on source and converted checkpoints."""

import converters
from converters.inspect import main


def test_inspect_source_and_converted(ckpts, tmp_path, capsys):
    assert main([str(ckpts["tp2"]), "--filter", "layers.3.mlp.experts.0.down_proj"]) == 0
    out = capsys.readouterr().out
    assert "# paddle-quantized-tp2 checkpoint, 2 rank(s)" in out
    assert "rank1/ernie.layers.3.mlp.experts.0.down_proj.quant_weight" in out
    assert "U16" in out and "[16, 128]" in out  # rank slice of K=128: 64 rows = 16 bytes rows
    assert "# total: 10 tensors" in out
    converters.convert_checkpoint(ckpts["w4w2_bf16"], tmp_path / "c", progress=False)
    assert main([str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "layers/3/mlp/experts/up_gate/quant_weight" in out and "[8, 32, 256]" in out
    assert "k_order=natural" in out


def test_inspect_bad_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
