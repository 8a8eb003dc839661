"""/metrics in the Prometheus text format, read from the engine at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefixflow.engine.engine import Engine


@dataclass
class ServerCounters:
    requests_ok: int = 0
    requests_failed: int = 0  # refused (400) or aborted by a disconnect
    disconnects: int = 0


class _EngineCollector:
    def __init__(self, engine: Engine, counters: ServerCounters) -> None:
        self.engine = engine
        self.counters = counters

    def collect(self):
        eng, c = self.engine, self.counters
        st, sched, pool = eng.stats, eng.scheduler, eng.pool
        req = CounterMetricFamily("prefixflow_requests", "Requests served", labels=["status"])
        req.add_metric(["ok"], c.requests_ok)
        req.add_metric(["failed"], c.requests_failed)
        yield req
        yield CounterMetricFamily(
            "prefixflow_disconnects", "Requests aborted by a client disconnect", c.disconnects
        )
        yield CounterMetricFamily("prefixflow_prompt_tokens", "Prompt tokens", st.prompt_tokens)
        yield CounterMetricFamily(
            "prefixflow_prompt_tokens_cached",
            "Prompt tokens read from the prefix cache (memory or disk)",
            st.cached_prompt_tokens,
        )
        yield CounterMetricFamily(
            "prefixflow_prompt_tokens_from_disk",
            "Of the cached prompt tokens, those read from the KV disk tier",
            st.disk_prompt_tokens,
        )
        yield CounterMetricFamily(
            "prefixflow_generation_tokens", "Generated tokens", st.output_tokens
        )
        yield CounterMetricFamily("prefixflow_preemptions", "Preemptions", st.preemptions)
        yield CounterMetricFamily(
            "prefixflow_spec_draft_tokens",
            "Tokens drafted by speculative decoding",
            st.draft_tokens,
        )
        yield CounterMetricFamily(
            "prefixflow_spec_accepted_tokens", "Drafted tokens accepted", st.accepted_tokens
        )
        yield GaugeMetricFamily(
            "prefixflow_queue_length",
            "Sequences waiting to start",
            len(sched.waiting) + len(sched.resumed),
        )
        yield GaugeMetricFamily(
            "prefixflow_running_sequences", "Sequences running", len(sched.running)
        )
        yield GaugeMetricFamily(
            "prefixflow_unfinished_requests", "Requests in the engine", eng.num_unfinished_requests
        )
        yield GaugeMetricFamily(
            "prefixflow_weight_version", "Weight updates since start", eng.weight_version
        )
        yield GaugeMetricFamily("prefixflow_kv_pages_used", "KV pages in use", pool.num_used)
        yield GaugeMetricFamily("prefixflow_kv_pages_total", "KV pages", pool.num_pages)
        # The cache is allocated untouched and pages are first written as they are first
        # handed out, so resident memory grows with this up to the KV budget, then stays.
        yield GaugeMetricFamily(
            "prefixflow_kv_bytes_touched",
            "Bytes of KV cache written at least once (resident)",
            pool.high_water * eng.kv_cache_bytes // pool.num_pages,
        )
        yield GaugeMetricFamily(
            "prefixflow_kv_utilisation",
            "KV pages in use / all pages",
            pool.num_used / pool.num_pages,
        )
        reuse = st.cached_prompt_tokens / st.prompt_tokens if st.prompt_tokens else 0.0
        yield GaugeMetricFamily(
            "prefixflow_prefix_reuse",
            "Prompt tokens read from the cache (memory or disk) / all prompt tokens",
            reuse,
        )


def metrics_registry(engine: Engine, counters: ServerCounters) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine, counters))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
