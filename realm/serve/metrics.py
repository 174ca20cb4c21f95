"""The server's Prometheus metrics, under a `realm:` prefix, named as vLLM names its (`vllm:...`) where it has one,
so that existing dashboards adapt by changing the prefix.

Gauges of the engine's state are read at scrape time (a collector), so they are never stale; counters and histograms
are updated as requests end.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from realm.runtime.generate import Completion

if TYPE_CHECKING:
    from realm.runtime.engine import Engine

# seconds: latency buckets from 1 ms to 2 minutes (a CPU prefill of a long prompt takes seconds)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 120.0)


class EngineCollector:
    """The engine's gauges, read when Prometheus scrapes."""

    def __init__(self, engine_of):
        self._engine_of = engine_of  # () -> Engine | None (None while the model loads)

    def collect(self):
        engine: Engine | None = self._engine_of()
        running = GaugeMetricFamily("realm:num_requests_running", "Requests in the running batch")
        waiting = GaugeMetricFamily("realm:num_requests_waiting", "Requests waiting to be scheduled")
        used = GaugeMetricFamily("realm:kv_blocks_used", "KV cache blocks in use")
        free = GaugeMetricFamily("realm:kv_blocks_free", "KV cache blocks free")
        usage = GaugeMetricFamily("realm:kv_cache_usage_perc", "KV cache usage (1 = full)")
        if engine is not None:
            blocks = engine.blocks
            running.add_metric([], len(engine.scheduler.running))
            waiting.add_metric([], engine.num_waiting)
            used.add_metric([], blocks.num_used)
            free.add_metric([], blocks.num_free)
            usage.add_metric([], blocks.num_used / blocks.num_blocks)
        yield from (running, waiting, used, free, usage)


class Metrics:
    def __init__(self, engine_of):
        self.registry = r = CollectorRegistry()
        r.register(EngineCollector(engine_of))
        self.prompt_tokens = Counter("realm:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("realm:generation_tokens", "Generated tokens", registry=r)
        self.prefix_cache_queries = Counter("realm:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                            "cache", registry=r)
        self.prefix_cache_hits = Counter("realm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                         registry=r)
        self.request_success = Counter("realm:request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=r)
        self.ttft = Histogram("realm:time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("realm:inter_token_latency_seconds", "Mean time between output tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("realm:e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("realm:request_queue_time_seconds", "Time from arrival to the first step",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.spec_draft = Counter("realm:spec_decode_num_draft_tokens", "Speculative proposals verified",
                                  registry=r)
        self.spec_accepted = Counter("realm:spec_decode_num_accepted_tokens", "Speculative proposals accepted",
                                     registry=r)
        self.adapter_requests = Counter("realm:lora_requests", "Requests by adapter (base: none)", ["adapter"],
                                        registry=r)
        self.rejected = Counter("realm:requests_rejected", "Requests refused before they ran, by HTTP status",
                                ["status"], registry=r)

    def finished(self, completion: Completion, reason: str, adapter: str | None, e2e_s: float) -> None:
        t = completion.timings
        self.prompt_tokens.inc(t.prompt_tokens)
        self.generation_tokens.inc(len(completion.token_ids))
        self.prefix_cache_queries.inc(t.prompt_tokens)
        self.prefix_cache_hits.inc(t.cached_tokens)
        self.request_success.labels(reason).inc()
        self.adapter_requests.labels(adapter or "none").inc()
        self.spec_draft.inc(t.proposed_tokens)
        self.spec_accepted.inc(t.accepted_tokens)
        self.e2e.observe(e2e_s)
        if t.generated_tokens:
            self.queue.observe(t.queue_s)
            self.ttft.observe(t.queue_s + t.prefill_s)
        if t.generated_tokens > 1:
            self.itl.observe(t.decode_s / (t.generated_tokens - 1))
