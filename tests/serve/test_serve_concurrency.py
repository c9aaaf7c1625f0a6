"""64 simultaneous streams, a quarter of them disconnecting mid-stream (MockModel server).

Every other request completes with exactly the greedy output it has when run alone, aborted
requests free their KV blocks, and ``/metrics`` returns to the idle baseline. The same check runs
against the real demo model in ``test_serve_demo_e2e.py``.
"""


def test_64_streams_with_disconnects_mock(make_mock_server, concurrency_check):
    with make_mock_server(max_num_seqs=64, max_num_batched_tokens=256,
                          decode_buckets=(4, 64), prefill_batch_buckets=(4,),
                          prefill_len_buckets=(64,)) as served:
        concurrency_check(served, long_tokens=300)
