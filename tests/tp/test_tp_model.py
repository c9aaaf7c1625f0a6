"""Tensor-parallel model on 8 (forced) CPU devices: each scenario of ``tp_scenarios.py`` runs in
its own interpreter, since the device count is fixed when jax starts."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).with_name("tp_scenarios.py")
ROOT = SCRIPT.parents[2]


def _env(devices: int) -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "")
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, what: str) -> None:
    print(out)
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-6000:]}"


def run_scenario(name: str, tmp_path: pathlib.Path, *args: str, devices: int = 8) -> str:
    proc = subprocess.run([sys.executable, str(SCRIPT), name, str(tmp_path), *args],
                          env=_env(devices), capture_output=True, text=True, timeout=900)
    _check(proc, proc.stdout + proc.stderr, f"scenario {name}")
    return proc.stdout


def test_tp_shards_equal_split_tp_slices(tmp_path):
    out = run_scenario("shards", tmp_path)
    assert "shards tp=8: every shard equals its split_tp slice" in out
    assert "tied TP8 fp32 forward" in out
    assert "tied TP8 jaxwint2.generate greedy tokens identical" in out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tp_checkpoints_logits_and_greedy_tokens(tmp_path, dtype):
    """TP1 source and FastDeploy rank*/ sources (TP2, TP4) loaded at TP 1, 2, 4 and 8 (fp32;
    bf16 at the source's TP and 8)."""
    from tp_scenarios import tp_sizes

    out = run_scenario("checkpoints", tmp_path, dtype)
    for n in (1, 2, 4):
        for tp in tp_sizes(n, dtype):
            assert f"tp{n}-source -> TP{tp} {dtype} logits" in out


def test_tp_wint2_experts_reordered_shard_by_shard(tmp_path):
    out = run_scenario("fragments", tmp_path, devices=2)
    for proj in ("up_gate", "down"):
        assert f"fragments {proj}: every shard is its local linear's fragment order" in out


def test_tp_openai_server_at_tp2(tmp_path):
    out = run_scenario("serve_demo", tmp_path, devices=2)
    assert "TP2 server completion" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tp_multiprocess_jax_distributed(tmp_path):
    """Two processes x two CPU devices, one ``jax.distributed`` job: a TP4 mesh across hosts."""
    import converters
    from jaxwint2.testing import random_params

    sys.path.insert(0, str(SCRIPT.parent))
    from tp_scenarios import tp_config

    cfg = tp_config()
    converters.write_paddle_checkpoint(cfg, random_params(cfg, seed=3), tmp_path / "ckpt",
                                       tp_size=2)
    port, n = str(_free_port()), 2
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), "multiprocess", str(tmp_path),
                               str(i), str(n), port], env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(n)]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        _check(p, out, f"process {i}")
        assert f"process {i}/{n} TP4 fp32 forward" in out
        assert f"process {i}/{n} TP4 generate tokens identical" in out
