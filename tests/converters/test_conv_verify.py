"""``python -m converters.verify``: a converted checkpoint matches its source; a damaged one not."""

import shutil

import converters
from converters.verify import main
from jaxwint2 import checkpoint


def test_verify_ok_then_detects_a_changed_byte(ckpts, tmp_path, capsys):
    dst = tmp_path / "c"
    converters.convert_checkpoint(ckpts["tp2"], dst, progress=False)
    assert main([str(ckpts["tp2"]), str(dst)]) == 0
    assert "OK" in capsys.readouterr().out
    cfg = checkpoint.read_config(dst)
    layer = checkpoint.restore_part(dst, "layers/2", cfg)
    layer["mlp"]["experts"]["down"]["weight_scale"][3, 0, 5] ^= 0x10
    shutil.rmtree(checkpoint.part_dir(dst, "layers/2"))
    checkpoint.save_part(dst, "layers/2", layer)  # one flipped nibble in one expert
    assert main([str(ckpts["tp2"]), str(dst)]) == 1
    out = capsys.readouterr().out
    assert "layers/2/mlp/experts/down/weight_scale: 1 bytes differ" in out


def test_verify_rejects_unconverted_dst(ckpts, capsys):
    assert main([str(ckpts["plain"]), str(ckpts["plain"])]) == 2
    assert "not a converted jaxwint2 checkpoint" in capsys.readouterr().err
