"""Tensor-parallel scenarios, each run in a fresh interpreter by ``test_tp_*.py``.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only takes effect before jax starts, and
other test directories import jax first, so every scenario runs as
``python tests/tp/tp_scenarios.py SCENARIO TMPDIR [args]`` with the flag in its environment.
A scenario raises on failure and prints one summary line per comparison.

The model: a tiny ERNIE whose every dimension splits 8 ways (8 heads over 2 kv heads, so TP 4
and 8 replicate kv heads; WINT2 expert ``down`` K = 512 = 8 ranks x one 64-row group), with a
dense layer, a WINT4 MoE layer and two WINT2 MoE layers, shared experts, untied lm_head. Its
WINT8 ``o`` has K = 256, so FastDeploy's int8 layout (K % 64 per rank) can be written up to TP 4.
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

PROMPTS = np.array([[1, 17, 300, 42, 5, 77], [3, 500, 9, 260, 11, 2]], np.int32)
NEW_TOKENS = 6


def tp_config(**kw):
    from jaxwint2.config import ErnieConfig

    return ErnieConfig.tiny(num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                            moe_intermediate_size=512, **kw)


def greedy(model, prompts: np.ndarray = PROMPTS, new: int = NEW_TOKENS, *,
           force: np.ndarray | None = None, block_size: int = 4):
    """Greedy decoding through ``model.step_jit``: ``(choices [B, new], logits [B, S, V])``.

    One token per step, the prompt's too (one compilation: the decode shape). ``logits[:, p]``
    are the fp32 logits after position ``p``; ``choices`` the argmax at each generated
    position. ``force`` (teacher forcing) feeds those tokens instead of the model's own choices,
    so two models see the same contexts.
    """
    b, t0 = prompts.shape
    per_seq = -(-(t0 + new) // block_size)
    cache = model.init_cache(b * per_seq, block_size)
    tables = np.arange(b * per_seq, dtype=np.int32).reshape(b, per_seq)
    seq = np.concatenate([prompts, np.zeros((b, new), np.int32)], axis=1)
    choices = np.zeros((b, new), np.int32)
    logits = []
    for pos in range(t0 + new - 1):
        out, cache = model.step_jit(seq[:, pos:pos + 1], np.full((b, 1), pos, np.int32), tables,
                                    cache, logits_at=np.zeros(b, np.int32))
        out = np.asarray(out)  # [B, V]
        logits.append(out)
        j = pos + 1 - t0
        if j >= 0:
            choices[:, j] = out.argmax(-1)
            seq[:, pos + 1] = choices[:, j] if force is None else force[:, j]
    return choices, np.stack(logits, axis=1)


def check_firm_choices(name: str, got, got_logits, want, want_logits) -> None:
    """Greedy choices agree wherever the reference's top-2 margin exceeds twice the logit error
    (bf16: a near-tie may flip under a different summation order, as between any two GPUs)."""
    t0 = PROMPTS.shape[1]
    ref = want_logits[:, t0 - 1:]  # [B, new, V]
    top2 = np.sort(ref, axis=-1)[..., -2:]
    err = np.abs(got_logits - want_logits)[:, t0 - 1:].max(-1)
    firm = top2[..., 1] - top2[..., 0] > 2 * err
    same = got == want
    assert same[firm].all(), f"{name}: firm greedy choices differ: {got} vs {want}"
    print(f"{name}: {int(same[firm].sum())}/{int(firm.sum())} firm greedy choices identical "
          f"({int(same.sum())}/{same.size} overall)")


def compare(name: str, got, want, dtype: str) -> None:
    """bf16: the logit tolerance of the model's own bf16 tests; fp32: near-exact."""
    from pallas_kernels.numerics import assert_close

    if dtype == "float32":
        s = assert_close(got, want, rel_l2=1e-5, min_frac_close=1.0, dtype="float32",
                         context=name)
    else:
        s = assert_close(got, want, rel_l2=3e-2, min_frac_close=0.95, context=name)
    print(f"{name}: {s}")


def _reference(cfg, params, dtype):
    from jaxwint2.model import ErnieForCausalLM

    return ErnieForCausalLM.from_params(cfg, params, kernels="reference", dtype=dtype)


def _parts(cfg, params):
    from jaxwint2 import checkpoint

    return ((p, checkpoint.get_part(params, p)) for p in checkpoint.part_names(cfg))


# --------------------------------------------------------------------------------------------
# scenarios
# --------------------------------------------------------------------------------------------


def shards(tmp: pathlib.Path) -> None:
    """Every device holds exactly ``converters.split_tp``'s slice; the sharded KV cache; the
    full forward and ``jaxwint2.generate`` with a tied head; size errors."""
    import jax
    from jax.sharding import PartitionSpec as P

    from converters import split_tp
    from jaxwint2 import checkpoint, layout, parallel
    from jaxwint2.testing import random_params

    cfg = tp_config()
    params = random_params(cfg, seed=0)
    for tp in (2, 4, 8):
        mesh = parallel.make_mesh(tp)
        sharded = parallel.shard_params(cfg, _parts(cfg, params), mesh)
        for part in checkpoint.part_names(cfg):
            i = checkpoint.layer_index(part)
            if i is None:
                got, at = sharded[part], None
            else:
                from jaxwint2.decoder import layer_groups

                g = next(n for n, g in enumerate(layer_groups(cfg)) if i in g)
                got, at = sharded["layer_stacks"][g], i - layer_groups(cfg)[g].start
            ranks = [split_tp(cfg, part, checkpoint.get_part(params, part), r, tp)
                     for r in range(tp)]
            for path, arr in jax.tree_util.tree_leaves_with_path(got):
                keys = [k.key for k in path]
                for shard in arr.addressable_shards:
                    r = list(mesh.devices.flat).index(shard.device)
                    want = ranks[r]
                    for k in keys:
                        want = want[k]
                    data = np.asarray(shard.data if at is None else shard.data[at])
                    assert data.dtype == want.dtype and np.array_equal(data, want), \
                        f"tp={tp} {part}/{'/'.join(keys)} rank {r}: shard != split_tp slice"
        print(f"shards tp={tp}: every shard equals its split_tp slice")
        # the GPU benchmark's on-device synthetic weights have these global shapes (traced)
        from jaxwint2.bench_tp import synthetic_sharded_params

        synth = jax.eval_shape(lambda mesh=mesh: synthetic_sharded_params(cfg, mesh))
        plain = layout.without_integer_codes(sharded)  # the benchmark's leave them to the model
        assert jax.tree.structure(synth) == jax.tree.structure(plain)
        for a, b in zip(jax.tree.leaves(synth), jax.tree.leaves(plain), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), (a, b)

    model = parallel.TPModel(cfg, parallel.shard_params(cfg, _parts(cfg, params),
                                                        parallel.make_mesh(8)),
                             parallel.make_mesh(8), kernels="reference")
    cache = model.init_cache(num_blocks=3, block_size=4)
    assert cache.k.shape == (cfg.num_hidden_layers, 3, 4, 8, cfg.head_dim), cache.k.shape
    assert cache.k.sharding.spec == P(None, None, None, "tp", None)
    assert {s.data.shape[3] for s in cache.k.addressable_shards} == {1}  # one kv head per rank
    # the full forward (model(token_ids)) with a tied, vocab-parallel head
    tied = tp_config(tie_word_embeddings=True)
    tied_params = random_params(tied, seed=2)
    want = np.asarray(_reference(tied, tied_params, "float32")(PROMPTS))
    mesh = parallel.make_mesh(8)
    model = parallel.TPModel(tied, parallel.shard_params(tied, _parts(tied, tied_params), mesh),
                             mesh, kernels="reference", dtype="float32")
    compare("tied TP8 fp32 forward", np.asarray(model(PROMPTS)), want, "float32")
    # TPModel is an NNX module: jaxwint2.generate's nnx.split / merge inside its jit works
    from jaxwint2 import generate

    prompts = [[1, 17, 300, 42], [3, 500, 9, 260, 11, 2, 7]]
    want_gen = generate(_reference(tied, tied_params, "float32"), prompts, max_new_tokens=4,
                        temperature=0.0)
    got_gen = generate(model, prompts, max_new_tokens=4, temperature=0.0)
    assert got_gen == want_gen, (got_gen, want_gen)
    print(f"tied TP8 jaxwint2.generate greedy tokens identical: {got_gen}")

    for bad, msg in ((3, "split"), (16, "devices")):
        try:
            parallel.make_mesh(bad) if bad > 8 else parallel.local_config(cfg, bad)
        except ValueError as e:
            assert msg in str(e), e
            print(f"tp={bad}: ValueError: {e}")
        else:
            raise AssertionError(f"tp={bad} did not raise")


def tp_sizes(source_tp: int, dtype: str) -> tuple[int, ...]:
    """The TP sizes :func:`checkpoints` loads a ``source_tp`` checkpoint at: every size in fp32
    (exact tokens), the source's own and 8 in bf16 (the dtype's path, at half the suite time)."""
    return (1, 2, 4, 8) if dtype == "float32" else tuple(sorted({source_tp, 8}))


def checkpoints(tmp: pathlib.Path, dtype: str) -> None:
    """Loads (at the sizes of :func:`tp_sizes`) of a TP1 Paddle checkpoint and of FastDeploy
    ``rank*/`` checkpoints written at TP 2 and 4 match the TP1 model built from the same tree.

    fp32 (activations; weights stay WINT2/4/8): free-running greedy decode, logits near-exact
    and identical tokens. bf16: teacher-forced decode, logits within the bf16 tolerance and
    identical firm greedy choices (:func:`check_firm_choices`). One token per step: one
    compilation per size (prefill chunks under TP: :func:`shards`' ``generate``).
    """
    import converters
    import jaxwint2
    from jaxwint2.testing import random_params

    cfg = tp_config()
    params = random_params(cfg, seed=1)
    f32 = dtype == "float32"
    want_tokens, want_logits = greedy(_reference(cfg, params, dtype))
    print(f"TP1 reference tokens {want_tokens.tolist()}")
    sources = {n: converters.write_paddle_checkpoint(
        cfg, params, tmp / f"paddle-tp{n}", tp_size=n, bf16_header="U16") for n in (1, 2, 4)}
    assert (sources[4] / "rank3").is_dir()
    for n, path in sources.items():
        for tp in tp_sizes(n, dtype):  # the programs compile once per size, shared by loads
            model = jaxwint2.load(path, tensor_parallel_size=tp, kernels="reference",
                                  dtype=dtype)
            name = f"tp{n}-source -> TP{tp} {dtype}"
            tokens, logits = greedy(model, force=None if f32 else want_tokens)
            compare(f"{name} logits", logits, want_logits, dtype)
            if f32:
                assert np.array_equal(tokens, want_tokens), (name, tokens, want_tokens)
                print(f"{name}: greedy tokens identical")
            else:
                check_firm_choices(name, tokens, logits, want_tokens, want_logits)


def multiprocess(tmp: pathlib.Path, process_id: str, num_processes: str, port: str) -> None:
    """One of ``num_processes`` processes of a ``jax.distributed`` job (2 CPU devices each):
    load the checkpoint at ``tmp/ckpt`` over all global devices and check against TP1."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(num_processes), process_id=int(process_id))
    from converters import load_checkpoint
    from jaxwint2 import parallel

    tp = jax.device_count()
    assert len(jax.local_devices()) < tp, "not a multi-process mesh"
    model = parallel.load_tensor_parallel(tmp / "ckpt", tp, kernels="reference",
                                          dtype="float32")
    cfg, params, _ = load_checkpoint(tmp / "ckpt")
    with jax.default_device(jax.local_devices()[0]):
        want = np.asarray(_reference(cfg, params, "float32")(PROMPTS))
    got = np.asarray(model(PROMPTS).addressable_data(0))  # replicated: any local copy
    compare(f"process {process_id}/{num_processes} TP{tp} fp32 forward", got, want, "float32")
    # the offline generate loop, run by every process (SPMD), as a multi-host user would
    from jaxwint2 import generate

    prompts = [[1, 17, 300, 42], [3, 500, 9, 260, 11, 2, 7]]
    got_gen = generate(model, prompts, max_new_tokens=3, temperature=0.0)
    with jax.default_device(jax.local_devices()[0]):
        want_gen = generate(_reference(cfg, params, "float32"), prompts, max_new_tokens=3,
                            temperature=0.0)
    assert got_gen == want_gen, (got_gen, want_gen)
    print(f"process {process_id}/{num_processes} TP{tp} generate tokens identical: {got_gen}")


def serve_demo(tmp: pathlib.Path) -> None:
    """The OpenAI server over the demo checkpoint at TP 2 (what ``python -m jaxwint2.serve
    --tensor-parallel-size 2`` builds): a greedy completion, with its usage counts."""
    import httpx

    from jaxwint2.demo import ensure_demo_model
    from jaxwint2.parallel import TPModel
    from serve.app import create_app
    from serve.engine import EngineConfig, load_engine
    from serve.testing import LoopbackServer

    config = EngineConfig(max_num_seqs=2, max_model_len=64, block_size=16, num_blocks=16,
                          max_num_batched_tokens=32, max_prefill_chunk=32, max_prefill_seqs=1,
                          decode_buckets=(2,), prefill_batch_buckets=(1,),
                          prefill_len_buckets=(32,), block_buckets=(4,), warmup="none")
    path = str(ensure_demo_model(tmp / "cache"))
    engine, tok = load_engine(path, kernels="reference", tensor_parallel_size=2, config=config)
    try:
        assert isinstance(engine.model, TPModel) and engine.model.tensor_parallel_size == 2
        with LoopbackServer(create_app(engine, tok, model_name="demo")) as srv:
            r = httpx.post(srv.url + "/v1/completions", timeout=600, json={
                "model": "demo", "prompt": "The colour of the sky is", "max_tokens": 8,
                "temperature": 0, "ignore_eos": True})
    finally:
        engine.shutdown()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8, body
    print(f"TP2 server completion: {body['choices'][0]['text']!r} usage {body['usage']}")


def fragments(tmp: pathlib.Path) -> None:
    """WINT2 expert stacks sharded over 2 devices (up_gate by columns, down by rows) re-ordered
    for the Mosaic kernel shard by shard: each device's block is the fragment order of its own
    local linear, in place and not, and the inverse gives the rows back."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import pallas_kernels
    from jaxwint2.parallel import make_mesh
    from pallas_kernels import kernel_mosaic, shapes

    mesh = make_mesh(2)
    cases = {"up_gate": (1024, 512, P(None, None, None, "tp")),
             "down": (1024, 256, P(None, None, "tp", None))}
    for proj, (k, n, spec) in cases.items():
        w = shapes.random_linear(jax.random.key(0), "wint2", k, n, 3)
        w = {f: jnp.stack([a, a[::-1]]) for f, a in w.items()}  # [L=2, E=3, ...]
        cols = P(None, None, "tp") if proj == "up_gate" else P()  # per-column leaves [L, E, N]
        put = {f: jax.device_put(a, NamedSharding(mesh, P(*spec[:a.ndim - 1], spec[-1])
                                                   if f in ("quant_weight", "weight_scale")
                                                   else cols)) for f, a in w.items()}
        assert kernel_mosaic.local_shape(put["quant_weight"])[-2:] == (
            (k // 4, n // 2) if proj == "up_gate" else (k // 8, n)), proj
        assert pallas_kernels.fragments_support(put), proj
        for in_place in (False, True):
            src = jax.tree.map(jnp.copy, put) if in_place else put
            f = pallas_kernels.to_fragments(src, in_place=in_place, integer=True)
            want = kernel_mosaic.integer_codes(jax.tree.map(np.asarray, w))  # unsharded fit
            for leaf in kernel_mosaic.INTEGER_CODE_LEAVES:  # fitted per shard, placed alike
                assert f[leaf].sharding == put["code_scale"].sharding, (proj, leaf)
                np.testing.assert_array_equal(np.asarray(f[leaf]), np.asarray(want[leaf]))
            for leaf, frag in (("quant_weight", kernel_mosaic.fragment_weights),
                               ("weight_scale", kernel_mosaic.fragment_scales)):
                got = f[leaf]
                assert got.sharding.spec == put[leaf].sharding.spec, (proj, leaf)
                for shard in got.addressable_shards:
                    local = np.asarray(put[leaf])[shard.index]  # [L, E, ...] rows of this shard
                    want = np.stack([np.asarray(frag(x)).reshape(x.shape) for x in local])
                    np.testing.assert_array_equal(np.asarray(shard.data), want,
                                                  err_msg=f"{proj} {leaf} {in_place=}")
        back = pallas_kernels.from_fragments(pallas_kernels.to_fragments(put))
        for leaf in w:
            np.testing.assert_array_equal(np.asarray(back[leaf]), np.asarray(w[leaf]))
        print(f"fragments {proj}: every shard is its local linear's fragment order")


SCENARIOS = {f.__name__: f for f in (shards, checkpoints, multiprocess, serve_demo, fragments)}

if __name__ == "__main__":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=N")
    name, tmp, *args = sys.argv[1:]
    SCENARIOS[name](pathlib.Path(tmp), *args)
    print(f"OK {name}")
