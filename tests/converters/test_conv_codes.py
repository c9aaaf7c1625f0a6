"""The integer code step's leaves (``code_a``, ``code_b``; jaxwint2/layout.py): stored by the
converter (format_version 2) and equal to the loader's own fit, checked independently on all
256 bytes; fitted as read for an older (version 1) conversion; a damaged leaf is named."""

import json
import shutil

import numpy as np
import pytest
from conv_sources import read_all

import converters
import jaxwint2
from converters.verify import verify
from jaxwint2 import checkpoint, layout
from jaxwint2.layout import INTEGER_CODE_LEAVES, linear_format
from pallas_kernels import kernel_mosaic, wint2


def _wint2_linears(tree, path=()):
    for k, v in tree.items():
        if isinstance(v, dict) and "quant_weight" in v and linear_format(v) == "wint2":
            yield "/".join((*path, k)), v
        elif isinstance(v, dict):
            yield from _wint2_linears(v, (*path, k))


def _codes_ok(a, b, cs, zp) -> np.ndarray:
    """Per column: ``(u * A + B) >> 16`` (mod 2^32, ``mad.lo.u32``) is the fused decode's code
    (:func:`wint2.wint2_codes_exact`) for every byte u."""
    u = np.arange(256, dtype=np.int64)[:, None]
    got = ((u * a.reshape(1, -1).astype(np.int64) + b.reshape(1, -1)) % 2**32) >> 16
    return (got == wint2.wint2_codes_exact(u, cs.reshape(1, -1), zp.reshape(1, -1))).all(0)


@pytest.fixture(scope="module")
def arbitrary(tmp_path_factory, tiny_cfg, tiny_params, data_dir):
    """A w4w2 source whose WINT2 columns have arbitrary fp32 ``code_scale`` / ``code_zp`` (not
    the dyadic closed form) and the golden file's one column without an exact pair, and its
    conversion."""
    root = tmp_path_factory.mktemp("codes")
    rng = np.random.default_rng(5)
    golden = np.load(data_dir / "wint2_golden.npz")
    odd = None
    for case in ("k128_n256", "k256_n128", "k320_n64", "k512_n192"):
        cs, zp = (golden[f"{case}/{f}"].reshape(-1) for f in ("code_scale", "code_zp"))
        exact = wint2.affine_codes(cs, zp)[2]
        if not exact.all():
            col = int(np.flatnonzero(~exact)[0])
            odd = (cs[col], zp[col])
    assert odd is not None
    params = {**tiny_params, "layers": list(tiny_params["layers"])}
    for i, layer in enumerate(params["layers"]):
        if not tiny_cfg.is_moe_layer(i) or tiny_cfg.expert_format(i) != "wint2":
            continue
        experts = {}
        for proj, lin in layer["mlp"]["experts"].items():
            shape = lin["code_scale"].shape
            cs = rng.uniform(100, 125, shape).astype(np.float32)
            zp = (rng.uniform(0, 1, shape) * (32767 - 255 * cs)).astype(np.float32)
            cs[1, 3], zp[1, 3] = odd
            experts[proj] = {**layout.without_integer_codes(lin), "code_scale": cs,
                             "code_zp": zp}
        params["layers"][i] = {**layer, "mlp": {**layer["mlp"], "experts": experts}}
    src = converters.write_paddle_checkpoint(tiny_cfg, params, root / "src", num_shards=1)
    converters.convert_checkpoint(src, root / "dst", progress=False)
    return src, root / "dst"


def _raw_parts(path, cfg):
    """Each part exactly as stored (no check, no fit)."""
    return {p: checkpoint.restore_part(path, p) for p in checkpoint.part_names(cfg)}


def test_converter_stores_the_loaders_fit(arbitrary, tiny_cfg):
    src, dst = arbitrary
    assert checkpoint.read_meta(dst)["format_version"] == layout.FORMAT_VERSION == 2
    assert INTEGER_CODE_LEAVES == kernel_mosaic.INTEGER_CODE_LEAVES  # what the kernel reads
    assert not [n for n in read_all(src) if n.endswith(INTEGER_CODE_LEAVES)]  # not Paddle's
    seen = none = 0
    for part, sub in _raw_parts(dst, tiny_cfg).items():
        checkpoint.check_part(tiny_cfg, part, sub)
        for path, lin in _wint2_linears(sub):
            a, b = lin["code_a"], lin["code_b"]
            assert a.dtype == b.dtype == np.int32 and a.shape == b.shape == lin["code_scale"].shape
            want_a, want_b, exact = wint2.affine_codes(lin["code_scale"], lin["code_zp"])
            np.testing.assert_array_equal(a, np.where(exact, want_a, 0), err_msg=path)
            np.testing.assert_array_equal(b, want_b, err_msg=path)
            ok = _codes_ok(a, b, lin["code_scale"], lin["code_zp"])  # the independent check
            assert ok[a.reshape(-1) != 0].all(), path
            assert (exact.reshape(-1) == (a.reshape(-1) != 0)).all(), path
            seen += a.size
            none += int((a == 0).sum())
    assert seen and 1 <= none < 0.05 * seen  # the golden non-affine column, ~2 % of the rest


def test_source_load_fits_the_same_codes(arbitrary):
    import jax

    src, dst = arbitrary
    _, a, _ = converters.load_checkpoint(src)  # converted in memory
    _, b, _ = converters.load_checkpoint(dst)  # stored
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert verify(src, dst) == []


def _rewrite(src, dst, tiny_cfg, edit, *, version=None):
    """A copy of the converted ``src`` with each raw part passed through ``edit(part, sub)``."""
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / f.name)
    for part, sub in _raw_parts(src, tiny_cfg).items():
        checkpoint.save_part(dst, part, edit(part, sub))
    if version is not None:
        meta = json.loads((dst / layout.META_FILE).read_text())
        (dst / layout.META_FILE).write_text(json.dumps({**meta, "format_version": version}))
    return dst


def test_version_1_conversion_loads_and_gets_the_codes(arbitrary, tiny_cfg, tmp_path):
    import jax

    src, dst = arbitrary
    old = _rewrite(dst, tmp_path / "v1", tiny_cfg,
                   lambda part, sub: layout.without_integer_codes(sub), version=1)
    raw = checkpoint.restore_part(old, "layers/3")
    assert not any(lin.keys() & set(INTEGER_CODE_LEAVES) for _, lin in _wint2_linears(raw))
    _, got, meta = checkpoint.load_params(old)
    _, want, _ = checkpoint.load_params(dst)
    assert meta["format_version"] == 1
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)
    assert verify(src, old) == []
    model = jaxwint2.load(old, kernels="reference", dtype="float32")
    ref = jaxwint2.load(dst, kernels="reference", dtype="float32")
    ids = np.array([[1, 5, 9, 2]])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(ref(ids)))
    # a version-1 part must not hold them; an unknown version is refused
    (old / layout.META_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match="code_a"):
        checkpoint.restore_part(dst, "layers/3", tiny_cfg, format_version=1)
    (old / layout.META_FILE).write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(ValueError, match=r"format_version 3; this jaxwint2 reads versions \[1, 2"):
        checkpoint.load_params(old)


def _corrupt(leaf, fn):
    def edit(part, sub):
        if part == "layers/3":
            lin = sub["mlp"]["experts"]["down"]
            if fn is None:
                del lin[leaf]
            else:
                lin[leaf] = fn(lin[leaf])
        return sub
    return edit


@pytest.mark.parametrize("leaf,fn,needle", [
    ("code_a", lambda a: a.astype(np.float32), "got float32 [8, 128], layout says int32 [8, 128]"),
    ("code_b", lambda b: b[:, :-1], "got int32 [8, 127], layout says int32 [8, 128]"),
    ("code_b", None, "missing ['mlp/experts/down/code_b']"),
])
def test_damaged_code_leaf_is_named(arbitrary, tiny_cfg, tmp_path, leaf, fn, needle):
    _, dst = arbitrary
    bad = _rewrite(dst, tmp_path / "bad", tiny_cfg, _corrupt(leaf, fn))
    for load in (checkpoint.load_params, lambda p: jaxwint2.load(p, kernels="reference")):
        with pytest.raises(ValueError) as e:
            load(bad)
        msg = str(e.value)
        print(msg)
        assert "'layers/3'" in msg and needle in msg and "format_version 2" in msg, msg
        if fn is not None:
            assert f"mlp/experts/down/{leaf}" in msg, msg


def test_a_dense_wint2_linear_gets_codes_per_column():
    """``add_integer_codes`` on a dense (unstacked) WINT2 linear: ``[N]`` leaves, each column's
    pair exact on all 256 bytes where it has one; other leaves untouched, non-WINT2 ones alone."""
    rng = np.random.default_rng(9)
    n = 192
    cs = rng.uniform(100, 125, n).astype(np.float32)
    zp = (rng.uniform(0, 1, n) * (32767 - 255 * cs)).astype(np.float32)
    lin = {"quant_weight": np.zeros((16, n), np.uint8), "weight_scale": np.zeros((1, n), np.uint8),
           "super_scales": np.ones(n, np.float32), "code_scale": cs, "code_zp": zp}
    tree = {"mlp": {"up_gate": lin}, "norm": {"weight": np.ones(8, np.float32)}}
    got = checkpoint.add_integer_codes(tree)
    a, b = (got["mlp"]["up_gate"][leaf] for leaf in INTEGER_CODE_LEAVES)
    assert a.shape == b.shape == (n,) and a.dtype == b.dtype == np.int32
    assert (a != 0).mean() > 0.99 and _codes_ok(a, b, cs, zp)[a != 0].all()
    assert got["norm"]["weight"] is tree["norm"]["weight"]  # other leaves shared, not copied
    assert got["mlp"]["up_gate"]["code_scale"] is cs
    assert checkpoint.add_integer_codes(got)["mlp"]["up_gate"]["code_a"] is a  # kept, not refit
