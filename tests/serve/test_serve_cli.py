"""``python -m jaxwint2.serve``: argument parsing, and a real process serving the demo model."""

import os
import re
import subprocess
import sys
import time

import httpx

from jaxwint2.serve import _size, parser


def test_arguments():
    args = parser().parse_args(["--port", "0", "--max-num-seqs", "8", "--kv-cache-memory",
                                "64MiB", "--no-enable-prefix-caching", "--api-key", "k",
                                "--kernels", "reference"])
    assert (args.port, args.max_num_seqs, args.kv_cache_memory) == (0, 8, 64 << 20)
    assert args.enable_prefix_caching is False and args.api_key == "k"
    assert args.model is None and args.host == "127.0.0.1"
    assert _size("2GiB") == 2 << 30 and _size("1000") == 1000 and _size("1.5kb") == 1500


def test_cli_serves_the_demo_model_until_terminated():
    cmd = [sys.executable, "-m", "jaxwint2.serve", "--port", "0", "--warmup", "none",
           "--max-num-seqs", "4", "--max-model-len", "64", "--kv-cache-memory", "8MiB",
           "--api-key", "k", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "listening on" in line:
                break
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        assert match, (line, proc.poll())
        url = match.group(1)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert models["data"][0]["id"] == "ernie-4.5-demo"
        assert models["data"][0]["max_model_len"] == 64
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode is not None
