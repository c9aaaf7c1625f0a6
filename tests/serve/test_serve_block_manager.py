"""BlockManager: allocation, reference counts, prefix-cache naming, LRU eviction."""

import pytest

from serve.block_manager import BlockManager, kv_bytes_per_block, num_blocks_for_budget
from serve.request import Request, SamplingParams


def make(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(), seed=0, stop_ids=frozenset())


def run_prefill(bm, req):
    """Admit ``req`` like the scheduler would and mark its whole prompt computed."""
    bm.acquire_prefix(req)
    assert bm.allocate_slots(req, req.num_tokens_to_compute)
    req.num_computed_tokens = len(req.token_ids)
    bm.cache_full_blocks(req)


def test_sizing_from_budget():
    per_block = kv_bytes_per_block(num_layers=28, num_kv_heads=4, head_dim=128, block_size=16)
    assert per_block == 2 * 28 * 16 * 4 * 128 * 2
    assert num_blocks_for_budget(10 * per_block + 5, per_block) == 10
    with pytest.raises(ValueError, match="smaller than one block"):
        num_blocks_for_budget(per_block - 1, per_block)


def test_allocate_and_free_return_to_baseline():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    r = make("a", range(10))                  # 10 tokens -> 3 blocks
    assert bm.allocate_slots(r, 10)
    assert len(r.block_ids) == 3 and bm.num_used_blocks == 3
    r.num_computed_tokens = 10
    assert bm.allocate_slots(r, 2)            # 12 tokens still fit in 3 blocks
    assert len(r.block_ids) == 3
    assert bm.allocate_slots(r, 3) and len(r.block_ids) == 4
    bm.free(r)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8 and r.block_ids == []


def test_allocation_failure_changes_nothing():
    bm = BlockManager(2, 4)
    r = make("a", range(12))
    assert not bm.allocate_slots(r, 12)
    assert r.block_ids == [] and bm.num_free_blocks == 2


def test_prefix_reuse_shares_full_blocks_only():
    bm = BlockManager(16, 4)
    a = make("a", range(10))                  # blocks [0..3] [4..7] full, [8, 9] partial
    run_prefill(bm, a)
    b = make("b", [*range(8), 99, 98, 97])    # shares the two full blocks
    cached = bm.acquire_prefix(b)
    assert cached == 8 and b.num_computed_tokens == 8
    assert b.block_ids == a.block_ids[:2]
    assert bm.num_used_blocks == 3            # nothing new allocated yet
    assert bm.allocate_slots(b, 3)
    assert b.block_ids[2] != a.block_ids[2]
    assert bm.prefix_hits == 8


def test_prefix_chain_depends_on_everything_before():
    bm = BlockManager(16, 4)
    run_prefill(bm, make("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # same second block, different first block: no hit at all
    assert bm.acquire_prefix(make("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])) == 0


def test_fully_cached_prompt_leaves_one_token_to_compute():
    bm = BlockManager(16, 4)
    run_prefill(bm, make("a", range(8)))
    b = make("b", range(8))
    assert bm.acquire_prefix(b) == 4          # the last block is recomputed for its logits
    assert b.num_tokens_to_compute == 4


def test_freed_blocks_stay_cached_until_reused_lru():
    bm = BlockManager(4, 2)
    a = make("a", [1, 2, 3, 4, 5])            # 3 blocks; 2 full ones get names
    run_prefill(bm, a)
    bm.free(a)
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    b = make("b", [1, 2, 3, 4, 9])
    assert bm.acquire_prefix(b) == 4          # found after a's release
    bm.free(b)
    # allocating every block evicts the names
    c = make("c", range(100, 108))
    assert bm.allocate_slots(c, 8)
    assert bm.num_cached_blocks == 0
    assert bm.acquire_prefix(make("d", [1, 2, 3, 4, 5])) == 0


def test_eviction_takes_least_recently_freed_tail_first():
    bm = BlockManager(6, 2)
    a = make("a", [1, 2, 3, 4, 5, 6, 7])      # 4 blocks, 3 full
    run_prefill(bm, a)
    bm.free(a)
    c = make("c", [50, 51, 52])               # needs 2 blocks: the 2 never-used ones go first
    assert bm.allocate_slots(c, 3)
    assert bm.acquire_prefix(make("x", [1, 2, 3, 4, 5, 6, 7])) == 6
    bm2 = BlockManager(4, 2)
    a2 = make("a", [1, 2, 3, 4, 5, 6, 7])     # all 4 blocks used
    run_prefill(bm2, a2)
    bm2.free(a2)
    assert bm2.allocate_slots(make("c", [9, 9, 9]), 3)   # takes a's two tail blocks first
    assert bm2.acquire_prefix(make("y", [1, 2, 3, 4, 5, 6, 7])) == 4


def test_duplicate_content_keeps_first_name_and_refcounts():
    bm = BlockManager(16, 4)
    a, b = make("a", range(9)), make("b", range(9))
    for r in (a, b):                          # both computed concurrently: no reuse possible
        assert bm.acquire_prefix(r) == 0
        assert bm.allocate_slots(r, 9)
    for r in (a, b):
        r.num_computed_tokens = 9
        bm.cache_full_blocks(r)
    assert bm.num_cached_blocks == 2          # b's identical blocks stay unnamed
    c = make("c", range(9))
    assert bm.acquire_prefix(c) == 8 and c.block_ids == a.block_ids[:2]
    bm.free(a)
    assert bm.num_used_blocks == 3 + 2 - 0    # b's 3 blocks + the 2 shared with c
    bm.free(b), bm.free(c)
    assert bm.num_used_blocks == 0


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(16, 4, enable_prefix_caching=False)
    run_prefill(bm, make("a", range(9)))
    assert bm.acquire_prefix(make("b", range(9))) == 0 and bm.num_cached_blocks == 0
