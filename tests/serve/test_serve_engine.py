"""Engine with the integer-exact MockModel: determinism, batch invariance, chunked prefill,
prefix reuse, seeds, stops, abort, preemption, queue limits and compile counts."""

import asyncio
import contextlib

import pytest

from serve.engine import Engine, EngineConfig, QueueFullError
from serve.request import FinishReason, SamplingParams
from serve.testing import ByteTokenizer, MockModel

TOK = ByteTokenizer()
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@contextlib.contextmanager
def engine(model=None, **kw):
    cfg = dict(max_num_seqs=8, max_model_len=256, block_size=4, num_blocks=256,
               max_num_batched_tokens=64, max_prefill_chunk=32, max_prefill_seqs=4,
               warmup="none")
    eng = Engine(model or MockModel(), TOK, EngineConfig(**{**cfg, **kw})).start()
    try:
        yield eng
    finally:
        eng.shutdown()


async def collect(eng, prompt, params=GREEDY, rid="r"):
    ids, text, last = [], "", None
    async for out in eng.submit(TOK.encode(prompt) if isinstance(prompt, str) else prompt,
                                params, rid):
        ids += out.token_ids
        text += out.text
        last = out
    return ids, text, last


def run_all(eng, prompts, params=GREEDY):
    async def main():
        return await asyncio.gather(*(collect(eng, p, params, f"r{i}")
                                      for i, p in enumerate(prompts)))
    return asyncio.run(main())


PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog " * 3, "a", "xyz" * 20,
           "hello there", "0123456789" * 7]


def test_greedy_is_deterministic_and_batch_invariant():
    with engine() as eng:
        alone = [run_all(eng, [p])[0] for p in PROMPTS]
        together = run_all(eng, PROMPTS)
        assert eng.stats().num_used_blocks == 0
    for (a_ids, a_text, a_last), (b_ids, b_text, _) in zip(alone, together, strict=True):
        assert a_ids == b_ids and a_text == b_text and len(a_ids) == 12
        assert a_last.finish_reason is FinishReason.LENGTH and a_last.num_output_tokens == 12


def test_chunked_prefill_matches_unchunked():
    long_prompt = "".join(chr(97 + i % 26) for i in range(150))
    with engine(max_prefill_chunk=16, max_num_batched_tokens=16) as eng:
        chunked = run_all(eng, [long_prompt, "short"])
    with engine(max_prefill_chunk=256, max_num_batched_tokens=256) as eng:
        whole = run_all(eng, [long_prompt, "short"])
    assert [c[0] for c in chunked] == [w[0] for w in whole]


def test_prefix_reuse_gives_the_same_tokens_and_hits_the_cache():
    system = "You are a helpful assistant. " * 4
    prompts = [system + "Q1?", system + "Q2, longer?", system + "Q1?"]
    with engine(enable_prefix_caching=False) as eng:
        ref = [run_all(eng, [p])[0][0] for p in prompts]
    with engine(enable_prefix_caching=True) as eng:
        got = [run_all(eng, [p])[0] for p in prompts]
        stats = eng.stats()
    assert [g[0] for g in got] == ref
    assert got[0][2].num_cached_tokens == 0
    assert got[1][2].num_cached_tokens >= len(system) - 4       # whole blocks of the prefix
    assert stats.prefix_cache_hits >= 2 * (len(system) - 4)


def test_seeded_sampling_is_reproducible_and_batch_independent():
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    with engine() as eng:
        alone = run_all(eng, ["sample me"], params)[0][0]
        again = run_all(eng, ["sample me"], params)[0][0]
        mixed = run_all(eng, ["sample me", "other", "x" * 40], params)[0][0]
        other_seed = run_all(eng, ["sample me"],
                             SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0][0]
    assert alone == again == mixed
    assert alone != other_seed


def test_eos_and_stop_tokens_end_the_request_without_text():
    with engine(MockModel(eos_at=20)) as eng:
        ids, text, last = run_all(eng, ["0123456789"],
                                  SamplingParams(max_tokens=50, temperature=0))[0]
        assert last.finish_reason is FinishReason.STOP and ids[-1] == TOK.eos_token_id
        assert len(ids) == 11 and len(text) == 10            # positions 10..19, then eos
        ignored = run_all(eng, ["0123456789"], SamplingParams(max_tokens=15, temperature=0,
                                                             ignore_eos=True))[0]
        assert ignored[2].finish_reason is FinishReason.LENGTH and len(ignored[0]) == 15
        first = ids[3]
        cut = run_all(eng, ["0123456789"], SamplingParams(max_tokens=50, temperature=0,
                                                         stop_token_ids=(first,)))[0]
        assert cut[2].finish_reason is FinishReason.STOP and cut[0][-1] == first


def test_stop_strings_cut_text_and_finish():
    with engine() as eng:
        ids, text, _ = run_all(eng, ["stop test"], SamplingParams(max_tokens=30,
                                                                  temperature=0))[0]
        stop = text[10:12]
        cut_ids, cut_text, last = run_all(eng, ["stop test"], SamplingParams(
            max_tokens=30, temperature=0, stop=(stop,)))[0]
    assert cut_text == text[:text.index(stop)]
    assert last.finish_reason is FinishReason.STOP
    assert cut_ids == ids[:len(cut_ids)] and len(cut_ids) == text.index(stop) + len(stop)


def test_abort_frees_blocks_and_leaves_others_untouched():
    with engine() as eng:
        ref = run_all(eng, ["survivor"], SamplingParams(max_tokens=40, temperature=0))[0][0]

        async def main():
            long = eng.submit(TOK.encode("abort me " * 10),
                              SamplingParams(max_tokens=200, temperature=0), "victim")
            survivor = asyncio.ensure_future(collect(
                eng, "survivor", SamplingParams(max_tokens=40, temperature=0), "s"))
            n = 0
            async for _ in long:
                n += 1
                if n == 3:
                    break
            await long.aclose()
            return (await survivor)[0]

        got = asyncio.run(main())
        for _ in range(200):
            if eng.stats().num_used_blocks == 0 and eng.stats().num_running == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert eng.stats().num_used_blocks == 0 and eng.stats().num_running == 0
    assert got == ref


def test_preemption_recomputes_and_keeps_outputs_exact():
    prompts = [f"request number {i} " * 3 for i in range(6)]
    params = SamplingParams(max_tokens=30, temperature=0)
    with engine() as eng:
        ref = [r[0] for r in run_all(eng, prompts, params)]
    with engine(num_blocks=40, enable_prefix_caching=False) as eng:  # 160 slots for ~6*80
        got = [r[0] for r in run_all(eng, prompts, params)]
        assert eng.stats().num_preemptions > 0 and eng.stats().num_used_blocks == 0
    assert got == ref


def test_steady_state_does_not_recompile():
    with engine(enable_prefix_caching=False) as eng:
        run_all(eng, PROMPTS)
        first = eng.stats().num_compilations
        run_all(eng, PROMPTS)                     # the same traffic again: no new shape
        assert first > 0 and eng.stats().num_compilations == first
        run_all(eng, [p[::-1] + "!" for p in PROMPTS] + ["z" * 200])
        r = eng.runner
        grid = ({("step", b, 1, p) for b in r.decode_buckets for p in r.block_buckets}
                | {("step", b, t, p) for b in r.prefill_batch_buckets
                   for t in r.prefill_len_buckets for p in r.block_buckets}
                | {("sample", b) for b in r.decode_buckets + r.prefill_batch_buckets})
        assert r.shapes <= grid and len(grid) < 100


def test_warmup_compiles_without_touching_the_cache():
    with engine(warmup="all") as eng:
        warm = eng.stats().num_compilations
        shapes = eng.runner.warmup_shapes("all")
        assert warm == len(shapes) + len({b for b, _, _ in shapes})     # steps + samplers
        assert run_all(eng, ["x"])[0][0] == run_all(eng, ["x"])[0][0]


def test_invalid_input_and_full_queue():
    with engine(max_num_seqs=1, max_waiting=2) as eng:
        async def main():
            with pytest.raises(ValueError, match="empty"):
                eng.submit([], GREEDY, "e")
            with pytest.raises(ValueError, match="maximum model length"):
                eng.submit([40] * 256, GREEDY, "long")
            with pytest.raises(ValueError, match="outside the vocabulary"):
                eng.submit([40, 10**6], GREEDY, "oov")
            params = SamplingParams(max_tokens=100, temperature=0)
            streams = [eng.submit(TOK.encode("q"), params, f"q{i}") for i in range(2)]
            for _ in range(500):                  # q0 runs (max_num_seqs=1), q1 waits
                if eng.stats().num_running == 1 and eng.stats().num_waiting == 1:
                    break
                await asyncio.sleep(0.01)
            streams.append(eng.submit(TOK.encode("q"), params, "q2"))
            with pytest.raises(QueueFullError):
                eng.submit(TOK.encode("q"), params, "overflow")
            with pytest.raises(ValueError, match="already in use"):
                eng.submit(TOK.encode("q"), params, "q0")
            for s in streams:
                await s.aclose()
            for i in range(3):
                eng.abort(f"q{i}")
        asyncio.run(main())
