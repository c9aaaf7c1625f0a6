"""serve: an OpenAI-compatible server with continuous batching over a paged KV cache.

The engine side (``Engine``, scheduler, block manager, runner) needs only JAX and NumPy, so it
also runs where FastAPI is absent (``python -m serve.bench`` on the GPU machine); the HTTP side
(``create_app``, ``run``) is imported on first use.
"""

# ---- engine (no HTTP) ----
from .block_manager import BlockManager as BlockManager
from .engine import Engine as Engine
from .engine import EngineClient as EngineClient
from .engine import EngineConfig as EngineConfig
from .engine import EngineStats as EngineStats
from .engine import QueueFullError as QueueFullError
from .engine import load_engine as load_engine
from .request import FinishReason as FinishReason
from .request import RequestOutput as RequestOutput
from .request import SamplingParams as SamplingParams
from .scheduler import Scheduler as Scheduler
from .scheduler import SchedulerConfig as SchedulerConfig

# ---- HTTP (FastAPI, pydantic, prometheus-client: imported lazily) ----
_LAZY = {"create_app": "app", "run": "app"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")


__all__ = ["BlockManager", "Engine", "EngineClient", "EngineConfig", "EngineStats",
           "FinishReason", "QueueFullError", "RequestOutput", "SamplingParams", "Scheduler",
           "SchedulerConfig", "create_app", "load_engine", "run"]
