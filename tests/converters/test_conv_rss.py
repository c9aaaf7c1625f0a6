"""The converter streams: its peak RSS grows with the largest layer, not with the checkpoint."""

import pytest

from converters.bench_rss import measure


@pytest.mark.slow
def test_rss_growth_far_below_checkpoint_size(tmp_path):
    r = measure(int(0.2e9), tmp_path, hidden=512)  # ~20 layers of ~7-14 MB
    assert r["checkpoint_bytes"] > 0.18e9
    # A converter that held the whole tree would grow by >= the checkpoint size.
    assert r["growth_bytes"] < 0.6 * r["checkpoint_bytes"], r
    assert r["growth_bytes"] < 8 * r["largest_part_bytes"] + 64 * 2**20, r
