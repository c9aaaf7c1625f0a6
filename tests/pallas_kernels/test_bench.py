"""``pallas_kernels.bench``'s protocol pieces that run anywhere: the timer, the Mosaic sweep's
candidates, and the tuned-table writer (the timings themselves need the GPU machine)."""

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bench, checks, config, kernel_mosaic, reference, shapes


def test_time_instances_traces_the_op_once_and_reports_per_instance_seconds():
    traces = []

    def fn(x):
        traces.append(x.shape)  # runs at trace time only
        return jnp.tanh(x) @ x.T

    insts = [(jax.random.normal(jax.random.key(i), (64, 64)),) for i in range(3)]
    sec = bench.time_instances(fn, insts, reps=2, min_seconds=0.001)
    assert traces == [(64, 64)], "one trace for every instance (nested jit): one compile"
    assert 0 < sec < 1.0


def test_wall_and_gpu_timing_of_one_op_share_one_compiled_program():
    traces = []

    def fn(x):
        traces.append(x.shape)
        return x * 2.0

    insts = [(jnp.ones((8, 8)),)]
    bench.time_instances(fn, insts, reps=1, min_seconds=0.001)
    bench.device_seconds(fn, insts)  # off a GPU: wall time again, through the same program
    assert traces == [(8, 8)]


def test_tune_problems_cover_both_projections_and_both_routings():
    shape = shapes.MoeShape(name="tiny", experts=8, top_k=2, hidden=256, inter=128)
    case = types.SimpleNamespace(shape=shape)
    probs = list(bench._tune_problems(case, [1, 4], "wint2", ("w_up", "w_down")))
    assert [p[0] for p in probs] == ["up_gate tokens=1", "up_gate tokens=4", "down tokens=1",
                                     "down tokens=4"]
    for label, act, key, insts, gs in probs:
        up = label.startswith("up_gate")
        assert act == ("swiglu" if up else None)
        k, n_out = (256, 128) if up else (128, 256)  # SwiGLU halves up_gate's 256 columns
        assert (key.k, key.n, key.groups) == (k, n_out, 8)
        assert len(insts) == 4 and insts[0][1] == ("w_up" if up else "w_down")
        rows = insts[0][0].shape[0]
        assert insts[0][0].shape == (rows, k) and gs.sum() == rows == key.rows
        for i, (_, _, g) in enumerate(insts[:2]):  # uniform routing, expert labels rotated
            np.testing.assert_array_equal(np.asarray(g), np.roll(gs, 7 * i))
        tokens = rows // shape.top_k  # then the skewed routing, rotated
        want = shapes.group_sizes(shapes.route(tokens, shape, "skewed", seed=tokens), 8)
        for i, (_, _, g) in enumerate(insts[2:]):
            np.testing.assert_array_equal(np.asarray(g), np.roll(want, 7 * i))


def test_mosaic_candidates_follow_the_shape():
    one_token = list(bench._mosaic_candidates(8, 64, 32, "swiglu"))  # 300B up_gate, 1 token
    assert {c.block_m for c in one_token} == {8, 16}
    assert {c.split_k for c in one_token if c.block_m == 8} == {1, 2, 4}
    assert all(c.split_k == 1 for c in one_token if c.block_m == 16)
    assert {(c.mma, c.planes) for c in one_token if c.block_m == 16} == {
        ("wgmma", "bf16"), ("sync", "bf16"), ("sync", "fp16")}
    # two K steps a pipeline step: mma.sync only, where the program's K steps divide
    assert {c.k_unroll for c in one_token if c.mma == "sync"} == {1, 2}
    assert all(c.k_unroll == 1 for c in one_token if c.mma == "wgmma")
    assert {c.k_unroll for c in bench._mosaic_candidates(8, 64, 14, None)
            if c.split_k == 2} == {1}  # 7 K steps a split
    odd_k = list(bench._mosaic_candidates(6, 64, 5, None))  # 5 K steps: no split divides but 1
    assert {c.split_k for c in odd_k} == {1}
    many = list(bench._mosaic_candidates(8192, 64, 14, None))  # 300B down, 1024 tokens
    assert {c.block_m for c in many} == {32, 64} and {c.col_blocks for c in many} == {1, 2, 4}
    swiglu = list(bench._mosaic_candidates(8192, 64, 32, "swiglu"))
    assert {c.col_blocks for c in swiglu} == {1, 2}  # 8 accumulators would not fit
    assert {c.mma for c in swiglu} == {"wgmma"}  # mma.sync only for tiles of <= 16 rows
    # the heuristic's tile, its tail heights left to the second stage (tail_variants)
    heuristic = kernel_mosaic.heuristic_config(8192, 64, "swiglu", n_out=3584)
    assert dataclasses.replace(heuristic, tails=()) in swiglu
    assert heuristic in bench.tail_variants(dataclasses.replace(heuristic, tails=()))
    # the most rows of one expert: heights that cut it into 1, 2, 3 tiles (151 -> -, 80, 56)
    fit = list(bench._mosaic_candidates(8192, 64, 32, "swiglu", max_rows=151))
    assert {c.block_m for c in fit} == {32, 56, 64, 80}
    plain = list(bench._mosaic_candidates(6144, 64, 6, None, max_rows=116))
    assert {c.block_m for c in plain} == {32, 40, 64, 120}  # one accumulator: up to 128


def test_tail_variants_of_a_wgmma_tile():
    cfg = config.MosaicConfig(block_m=80, col_blocks=2)
    assert [c.tails for c in bench.tail_variants(cfg)] == [(16, 32, 48, 64), (40,)]
    assert all(dataclasses.replace(c, tails=()) == cfg for c in bench.tail_variants(cfg))
    assert [c.tails for c in bench.tail_variants(config.MosaicConfig(block_m=32))] == [(16,)]
    assert bench.tail_variants(config.MosaicConfig(block_m=16)) == []
    assert bench.tail_variants(config.MosaicConfig(block_m=48, mma="sync")) == []
    # the variant already in the entry is not timed twice
    assert [c.tails for c in bench.tail_variants(config.MosaicConfig(
        block_m=48, tails=(24,)))] == [(16, 32)]


def test_tails_only_tune_times_each_tuned_entry_against_its_variants(tmp_path, monkeypatch):
    """``--tune-mosaic --tails-only``: only problems with an entry of their own key are swept,
    the entry first, then its tail variants; the winner is what gets written."""
    key = "wint2|none|64|256|128|1024"
    entry = {"config": config.MosaicConfig(block_m=48).to_dict(), "us": 1.0}
    (tmp_path / f"{config.device_key()}.json").write_text(json.dumps({"mosaic": {key: entry}}))
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    config._tuned_table.cache_clear()
    problems = [(lbl, None, config.TunedKey("wint2", "none", 64, 256, 128, rows),
                 [(jnp.zeros((rows, 256), jnp.bfloat16), None, None)], None)
                for lbl, rows in (("down tokens=128", 1024), ("down tokens=1", 8))]
    swept = []

    def sweep(op, insts, cands, k, label):
        swept.append((str(k), [c.tails for c in cands]))
        return str(k), {"config": cands[-1].to_dict(), "us": 0.5}

    monkeypatch.setattr(bench, "_tune_problems", lambda *a: iter(problems))
    monkeypatch.setattr(bench, "_sweep", sweep)
    case = types.SimpleNamespace(frag=None, shape=types.SimpleNamespace(experts=64))
    try:
        table = bench.tune_mosaic(case, [128, 1], tails_only=True)
    finally:
        config._tuned_table.cache_clear()
    assert swept == [(key, [(), (16, 32), (24,)])]
    assert list(table) == [key] and table[key]["config"]["tails"] == (24,)


def test_write_tuned_keeps_the_other_section(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "TUNED_DIR", tmp_path)
    path = tmp_path / f"{config.device_key()}.json"
    path.write_text(json.dumps({"configs": {"k1": {"config": {}}}, "meta": {"command": "old"}}))
    entry = {"config": config.MosaicConfig(block_m=16, col_blocks=2).to_dict(), "us": 1.0}
    try:
        bench._write_tuned({"wint2|none|64|256|128|8": entry}, {"command": "new"}, "mosaic")
        raw = json.loads(path.read_text())
        assert raw["configs"] == {"k1": {"config": {}}} and raw["meta"] == {"command": "old"}
        assert raw["mosaic_meta"] == {"command": "new"}
        assert config._tuned_table(config.device_key(), "mosaic") == {
            "wint2|none|64|256|128|8": config.MosaicConfig(block_m=16, col_blocks=2)}
    finally:
        config._tuned_table.cache_clear()


def test_device_seconds_falls_back_to_wall_time_without_a_gpu_trace():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU the trace holds the kernels (the dense tuner's path)")
    insts = [(jnp.full((32, 32), float(i)),) for i in range(2)]
    sec = bench.device_seconds(lambda x: x @ x, insts)
    assert 0 < sec < 1.0


def test_bench_row_checks_times_and_tables_a_tiny_ffn(monkeypatch):
    """One FFN row end to end on a tiny shape (interpret mode off a GPU): each impl checked
    against the reference, every timed impl gets a row (``--gpu-time``: a GPU kernel time too),
    and the table's ratios come from those rows. The timer is a stub (interpret mode is slow)."""
    seconds = iter(range(1, 100))
    monkeypatch.setattr(bench, "time_instances", lambda fn, insts: next(seconds) * 1e-3)
    shape = shapes.MoeShape(name="tiny", experts=4, top_k=2, hidden=256, inter=128)
    case = bench.Case(shape)
    ceil = {"copy_GBps": 1.0, "bf16_matmul_TFLOPs": 1.0}
    rows = bench.bench_row(case, 2, "uniform", ceil, baselines=True, gpu_time=True)
    impls = {(r["impl"], r["fmt"]) for r in rows}
    assert {("pallas", "wint2"), ("pallas", "wint4"), ("xla_bf16", "bf16"),
            ("xla_naive_decode", "wint2")} <= impls
    assert all(r["us"] > 0 and r["gpu_us"] > 0 and r["rows"] == 4 for r in rows)
    wint2 = next(r for r in rows if (r["impl"], r["fmt"]) == ("pallas", "wint2"))
    bf16 = next(r for r in rows if r["impl"] == "xla_bf16")
    table = bench._table(rows).splitlines()
    assert len(table) == 4 and "GPU kernel time" in table[3]
    assert f"| {bf16['gpu_us'] / wint2['gpu_us']:.2f} |" in table[3]


def test_dense_rows_check_time_and_table_one_linear(monkeypatch):
    """``--dense`` on a tiny linear (interpret mode off a GPU): ``--linears`` picks it, the
    kernel is checked and timed, ``--no-baselines`` leaves the XLA rows out, ``--gpu-time``
    adds the GPU column. The timer is a stub (interpret mode is slow)."""
    seconds = iter(range(1, 100))
    monkeypatch.setattr(bench, "time_instances", lambda fn, insts: next(seconds) * 1e-3)
    monkeypatch.setitem(shapes.DENSE, "tiny", (shapes.DenseLinear("a", 256, 128, "wint8"),
                                               shapes.DenseLinear("b", 256, 64, "wint4")))
    ceil = {"copy_GBps": 1.0, "bf16_matmul_TFLOPs": 1.0}
    rows = bench.dense_rows(ceil, [2], shape_names=["tiny"], linears=["a"], baselines=False,
                            gpu_time=True)
    assert [(r["linear"], r["impl"], r["fmt"]) for r in rows] == [("a", "pallas", "wint8")]
    assert rows[0]["us"] > 0 and rows[0]["gpu_us"] > 0
    full = bench.dense_rows(ceil, [2], shape_names=["tiny"], linears=["a"])
    assert {(r["impl"], r["fmt"]) for r in full} == {("pallas", "wint8"), ("xla", "wint8"),
                                                     ("xla", "bf16")}
    [row] = bench._dense_table(rows).splitlines()[2:]
    assert row.startswith("| tiny | a | 2 | pallas:wint8 | 1000.0 |") and row.endswith("% |")
    assert all(r.endswith("| - | - |") for r in bench._dense_table(full).splitlines()[2:])


def test_tune_dense_times_the_layers_of_one_stack_passed_as_an_argument(monkeypatch):
    """The dense tuner's instances are the layers of one stacked weight, each read in place, the
    weight an argument of the timed program (closed over, each candidate's compile embedded it);
    the fastest candidate becomes the entry, written as found."""
    monkeypatch.setitem(shapes.DENSE, "tiny", (shapes.DenseLinear("a", 256, 64, "wint8"),))
    cands = [config.TuningConfig(block_m=16, block_n=32, block_k=64),
             config.TuningConfig(block_m=1, block_n=32, block_k=16, num_stages=1, split_k=2,
                                 mode="fma")]
    monkeypatch.setattr(bench, "_dense_candidates", lambda rows: iter(cands))
    seen = []

    def fake_device_seconds(fn, insts):
        cfg = fn.keywords["config"]
        layers = [int(layer) for _, _, layer in insts]
        w = insts[0][1]
        assert all(i[1] is w for i in insts) and w["quant_weight"].shape[0] == len(insts)
        for x, w, layer in insts[:2]:  # each layer's output is that layer's matmul
            y = fn.func(x, w, layer, interpret=True, config=cfg)
            want = reference.quant_matmul_reference(
                x, {k: v[int(layer)] for k, v in w.items()}, fmt="wint8")
            checks.assert_close(y, want)
        seen.append((cfg.mode, layers))
        return {"mma": 4e-6, "fma": 2e-6}[cfg.mode]

    monkeypatch.setattr(bench, "device_seconds", fake_device_seconds)
    written = []
    table = bench.tune_dense([1], shape_names=["tiny"], write=written.append)
    n = len(seen[0][1])
    assert n >= 2 and seen == [("mma", list(range(n))), ("fma", list(range(n)))]
    [(key, entry)] = table.items()
    assert key == "wint8|none|1|256|64|1" and written == [table]
    assert entry["config"]["mode"] == "fma" and entry["us"] == pytest.approx(2.0)
