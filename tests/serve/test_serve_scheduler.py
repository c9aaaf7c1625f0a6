"""Scheduler policy with a fake model step: decode priority, chunked prefill, preemption."""

import pytest

from serve.block_manager import BlockManager
from serve.request import FinishReason, Request, RequestStatus, SamplingParams
from serve.scheduler import Scheduler, SchedulerConfig


def make(rid, n_prompt, max_tokens=4, stop_ids=frozenset()):
    return Request(rid, list(range(10, 10 + n_prompt)), SamplingParams(max_tokens=max_tokens),
                   seed=0, stop_ids=stop_ids)


def step(sched, token=7):
    out = sched.schedule()
    sampled = {c.req.request_id: token for c in out.chunks if c.sample}
    return out, sched.update(out, sampled)


def sched_with(num_blocks=64, block_size=4, **kw):
    cfg = SchedulerConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 16,
                             "max_prefill_chunk": 8, "max_model_len": 64, **kw})
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def test_config_validation():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4, max_prefill_chunk=4)


def test_chunked_prefill_then_decode():
    s = sched_with()
    s.add(make("a", 20))
    sizes = []
    for _ in range(3):
        out, new = step(s)
        sizes.append([(c.start, c.num_tokens) for c in out.chunks])
    assert sizes == [[(0, 8)], [(8, 8)], [(16, 4)]]   # the last chunk samples
    assert new[0][1] == 7 and s.running[0].num_output_tokens == 1
    out, _ = step(s)
    assert [(c.start, c.num_tokens, c.sample) for c in out.chunks] == [(20, 1, True)]


def test_decodes_go_first_and_long_prompt_does_not_stall_them():
    s = sched_with(max_num_batched_tokens=10, max_prefill_chunk=8)
    s.add(make("a", 3, max_tokens=50))
    step(s)                                       # a prefilled, now decoding
    s.add(make("long", 40))
    for _ in range(5):
        out, _ = step(s)
        ids = [(c.req.request_id, c.num_tokens) for c in out.chunks]
        assert ids[0] == ("a", 1)                 # a decodes every step
        assert ids[1][0] == "long" and ids[1][1] == 8
        assert out.num_tokens <= 10


def test_max_num_seqs_and_budget_limit_admission():
    s = sched_with(max_num_seqs=2)
    for i in range(5):
        s.add(make(f"r{i}", 3))
    out, _ = step(s)
    assert len(out.chunks) == 2 and s.num_running == 2 and s.num_waiting == 3


def test_finish_on_max_tokens_stop_token_and_max_model_len():
    s = sched_with(max_model_len=12)
    s.add(make("len", 3, max_tokens=2))
    s.add(make("stop", 3, max_tokens=10, stop_ids=frozenset({7})))
    s.add(make("ctx", 9, max_tokens=100))
    finished = {}
    for _ in range(10):
        _, new = step(s)
        for req, _ in new:
            if req.finish_reason is not None:
                finished[req.request_id] = (req.finish_reason, req.num_output_tokens)
    assert finished == {"len": (FinishReason.LENGTH, 2), "stop": (FinishReason.STOP, 1),
                        "ctx": (FinishReason.LENGTH, 3)}
    assert not s.has_work() and s.bm.num_used_blocks == 0


def test_abort_frees_blocks_everywhere():
    s = sched_with(max_num_seqs=1)
    s.add(make("run", 6, max_tokens=10))
    s.add(make("wait", 6))
    step(s)
    assert s.bm.num_used_blocks > 0
    assert s.finish("wait", FinishReason.ABORT).status is RequestStatus.FINISHED
    assert s.finish("run", FinishReason.ABORT) is not None
    assert s.finish("run", FinishReason.ABORT) is None          # idempotent
    assert s.bm.num_used_blocks == 0 and not s.has_work()


def test_preemption_under_memory_pressure_then_resume():
    # 6 blocks of 4 tokens; two requests that each grow to 12 tokens cannot both fit
    s = sched_with(num_blocks=6, block_size=4, max_model_len=64)
    s.add(make("a", 8, max_tokens=8))
    s.add(make("b", 8, max_tokens=8))
    done = set()
    for _ in range(60):
        out, new = step(s)
        if out.preempted:
            assert all(r.status is RequestStatus.WAITING for r in out.preempted)
            assert all(c.req not in out.preempted for c in out.chunks)
        done |= {r.request_id for r, _ in new if r.finish_reason is not None}
        assert s.bm.num_used_blocks <= 6
        if not s.has_work():
            break
    assert done == {"a", "b"} and s.num_preemptions >= 1
    assert s.bm.num_used_blocks == 0


def test_update_skips_requests_aborted_during_the_step():
    s = sched_with()
    s.add(make("a", 3))
    out = s.schedule()
    s.finish("a", FinishReason.ABORT)
    assert s.update(out, {"a": 7}) == []


def test_prefill_rows_padded_area_stays_within_budget():
    s = sched_with(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_chunk=16,
                   max_prefill_seqs=8)
    s.add(make("long", 40))
    for i in range(6):
        s.add(make(f"short{i}", 3))
    for _ in range(8):
        out, _ = step(s)
        pre = [c.num_tokens for c in out.chunks if c.num_tokens > 1]
        if pre:
            assert len(pre) * max(pre) <= 32, pre
    out = s.schedule()
    assert s.num_waiting == 0
