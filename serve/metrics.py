"""Prometheus metrics of the server (``GET /metrics``), via ``prometheus-client``.

Owns one private :class:`~prometheus_client.CollectorRegistry` per app (so several servers can
live in one process, as in tests) holding:

* counters: HTTP requests by endpoint and status, finished requests by reason, prompt and
  generation tokens;
* histograms: time to first token, inter-token latency, end-to-end latency;
* gauges read from :meth:`~serve.engine.EngineClient.stats` at scrape time: running and waiting
  requests, KV-cache usage and blocks, prefix-cache blocks and hits, preemptions, compilations.

It is the engine's :class:`~serve.engine.StatsObserver` (called from the engine thread;
prometheus-client is thread-safe). Knows nothing about HTTP routing or the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import EngineStats

PREFIX = "jaxwint2_"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3,
                   0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class _EngineCollector:
    """Gauges computed from an engine snapshot on each scrape."""

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        if s is None:
            return
        gauges = {
            "num_requests_running": ("Requests in the running batch.", s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", s.num_waiting),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks held by requests.",
                                     s.kv_cache_usage),
            "kv_cache_blocks_total": ("KV-cache blocks.", s.num_blocks),
            "kv_cache_blocks_used": ("KV-cache blocks held by requests.", s.num_used_blocks),
            "prefix_cache_blocks": ("Blocks named in the prefix cache.", s.num_cached_blocks),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = {
            "compilations": ("Distinct step shapes compiled.", s.num_compilations),
            "preemptions": ("Requests preempted for KV-cache space.", s.num_preemptions),
            "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                                     s.prefix_cache_queries),
            "prefix_cache_hits": ("Prompt tokens found in the prefix cache.",
                                  s.prefix_cache_hits),
            "engine_steps": ("Engine steps run.", s.num_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class Metrics:
    """Server metrics; also the engine's stats observer.

    Example:
      >>> metrics = Metrics(lambda: engine.stats())
      >>> engine.observer = metrics
      >>> body, content_type = metrics.render()
    """

    def __init__(self, stats: Callable[[], EngineStats | None]):
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests.",
                                     ["endpoint", "status"], registry=r)
        self.request_success = Counter(PREFIX + "request_success",
                                       "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Generated tokens.",
                                         registry=r)
        self.prefill_tokens = Counter(PREFIX + "prefill_tokens", "Prompt tokens computed "
                                      "(prefix-cache hits excluded).", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between tokens.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request latency.",
                             buckets=E2E_BUCKETS, registry=r)
        r.register(_EngineCollector(stats))

    # ---- StatsObserver ----
    def on_step(self, *, ttfts: Sequence[float], itls: Sequence[float],
                num_generation_tokens: int, num_prefill_tokens: int) -> None:
        for t in ttfts:
            self.ttft.observe(t)
        for t in itls:
            self.itl.observe(t)
        self.generation_tokens.inc(num_generation_tokens)
        self.prefill_tokens.inc(num_prefill_tokens)

    def on_finish(self, *, finish_reason: str, e2e_latency: float, num_prompt_tokens: int,
                  num_output_tokens: int) -> None:
        self.request_success.labels(finish_reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.e2e.observe(e2e_latency)

    # ---- HTTP ----
    def on_http(self, endpoint: str, status: int) -> None:
        self.http_requests.labels(endpoint, str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
