"""``python -m serve.bench`` runs in-process on the MockModel and reports sane rows."""

import json

from serve import bench


def test_bench_mock_sweep(tmp_path, capsys):
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--mock", "--concurrency", "1,4", "--num-prompts", "6", "--prompt-len",
                       "20", "--max-tokens", "5", "--max-num-seqs", "4", "--max-model-len",
                       "64", "--block-size", "4", "--kv-cache-memory-mib", "1",
                       "--json", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["requests"] == 6 and r["output_tokens"] == 30        # ignore_eos: exact
        assert 0 < r["ttft_ms_p50"] <= r["ttft_ms_p90"] <= r["ttft_ms_p99"]
        # a worker that wakes once for tokens of several steps measures near-zero gaps (the
        # mock engine steps in ~0.2 ms), so only the tail has to be a real step
        assert 0 <= r["itl_ms_p50"] <= r["itl_ms_p90"] <= r["itl_ms_p99"]
        assert r["itl_ms_p99"] > 0 and r["output_tok_s"] > 0
        assert r["new_compilations"] == 0                               # warmed per level
    assert "| conc |" in capsys.readouterr().out


def test_bench_synthetic_model(tmp_path):
    """``--synthetic``: the real model with device-built random weights (tiny preset here)."""
    out = tmp_path / "bench.jsonl"
    assert bench.main(["--synthetic", "tiny", "--concurrency", "2", "--num-prompts", "2",
                       "--prompt-len", "12", "--max-tokens", "3", "--max-num-seqs", "2",
                       "--max-model-len", "64", "--block-size", "16", "--kv-cache-memory-mib",
                       "1", "--json", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["model"] == "synthetic-tiny" and row["output_tokens"] == 6
    assert row["new_compilations"] == 0
