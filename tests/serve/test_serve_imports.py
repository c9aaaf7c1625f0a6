"""The engine side imports without the HTTP stack (the GPU machine has no FastAPI)."""

import subprocess
import sys

CODE = """
import sys
import serve, serve.bench, serve.engine
heavy = [m for m in ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client")
         if m in sys.modules]
assert not heavy, heavy
assert callable(serve.create_app) and "fastapi" in sys.modules   # lazily, on first use
"""


def test_engine_and_bench_do_not_import_http():
    subprocess.run([sys.executable, "-c", CODE], check=True, timeout=120)
