"""Calibration from text: layer-by-layer Hessian capture, and its effect on held-out outputs."""

import pathlib

import numpy as np
import pytest

import converters
import jaxwint2
from jaxwint2 import calibrate
from jaxwint2.demo import train_tokenizer
from jaxwint2.generate import generate
from jaxwint2.quantize import main
from jaxwint2.testing import write_hf_checkpoint
from pallas_kernels.reference import dequantize

# 3 layers: 0 dense, 1 and 2 MoE, every MoE layer WINT2 (--w4-end-layer -1)
TINY = dict(num_hidden_layers=3, moe_layer_end_index=2, moe_num_experts=4,
            moe_intermediate_size=64, vocab_size=1024)
CORPUS = pathlib.Path(jaxwint2.__file__).with_name("demo_corpus.txt")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    write_hf_checkpoint(root / "hf", seed=5, **TINY)
    train_tokenizer(root / "hf")
    paragraphs = [p for p in CORPUS.read_text().splitlines() if p.strip()]
    cut = 2 * len(paragraphs) // 3
    (root / "cal.txt").write_text("\n\n".join(paragraphs[:cut]))
    (root / "held_out.txt").write_text("\n\n".join(paragraphs[cut:]))
    common = [str(root / "hf"), "--w4-end-layer", "-1", "--effort", "fast", "--no-progress"]
    assert main([common[0], str(root / "plain"), *common[1:]]) == 0
    assert main([common[0], str(root / "cal"), *common[1:],
                 "--calibration-text", str(root / "cal.txt")]) == 0
    return root


def _held_out_grams(root):
    """Per WINT2 linear: ``(X_e^T X_e [E, K, K], n_e [E])`` of the held-out text (bf16 model)."""
    ids = calibrate.tokenize_file(root / "hf", root / "held_out.txt", max_tokens=4096)
    cfg, _, parts = converters.iter_checkpoint(root / "hf")
    cal = calibrate.Calibrator(cfg, ids, prior_tokens=0.0)
    out, weights = {}, {}
    for part, sub in parts:
        h = cal.observe(part, sub)
        i = part.split("/")[-1]
        for key, v in h.items():
            counts = cal.expert_tokens[int(i)]
            out[key] = (v * counts[:, None, None], counts)
            name = key.rsplit("/", 1)[1]
            weights[key] = np.asarray(sub["mlp"]["experts"][name]["weight"], np.float32)
    return out, weights


def test_calibration_text_lowers_held_out_output_error(run):
    grams, weights = _held_out_grams(run)
    assert set(grams) == {f"layers/{i}/mlp/experts/{n}" for i in (1, 2) for n in ("up_gate",
                                                                                   "down")}
    errs = {}
    for variant in ("plain", "cal"):
        _, params, _ = converters.load_checkpoint(run / variant)
        num = den = 0.0
        for key, (g, _) in grams.items():
            _, i, _, _, name = key.split("/")
            lin = params["layers"][int(i)]["mlp"]["experts"][name]
            wh = np.asarray(dequantize(lin, "wint2", dtype=np.float32), np.float64)
            w = weights[key].astype(np.float64)
            d = w - wh  # ||X dW||^2 = tr(dW^T X^T X dW), per expert
            num += np.einsum("ekn,ekl,eln->", d, g, d)
            den += np.einsum("ekn,ekl,eln->", w, g, w)
        errs[variant] = float(np.sqrt(num / den))
    assert errs["cal"] < 0.96 * errs["plain"], errs  # measured 0.312 -> 0.293


def test_calibrated_checkpoint_loads_and_generates(run):
    model = jaxwint2.load(run / "cal", kernels="reference")
    out = generate(model, [[1, 5, 9, 13]], max_new_tokens=4, temperature=0.0,
                   stop_token_ids=[])
    assert len(out[0]) == 4 and all(0 <= t < TINY["vocab_size"] for t in out[0])


def test_tokenize_rows_and_jsonl(tmp_path):
    class Tok:
        bos_token_id = 1

        def encode(self, text):
            return [ord(c) for c in text]

    ids = calibrate.tokenize(Tok(), ["abcd", "efg"], max_tokens=100, seq_len=4)
    np.testing.assert_array_equal(ids, [[1, 97, 98, 99], [100, 1, 101, 102]])  # 9 -> 2 rows
    assert calibrate.tokenize(Tok(), ["ab" * 50], max_tokens=10, seq_len=4).shape == (2, 4)
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert calibrate.read_text(tmp_path / "c.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match="'text'"):
        calibrate.read_text(tmp_path / "bad.jsonl")


def test_cli_rejects_both_calibrations(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "o"), "--calibration", "h.npz",
              "--calibration-text", "t.txt"])
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "o"), "--calibration-tokens", "64"])
