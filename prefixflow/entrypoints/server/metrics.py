"""/metrics in the Prometheus text format, read from the engine at scrape time."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from prefixflow.engine.engine import Engine
from prefixflow.entrypoints.server.backpressure import RequestGate


@dataclass
class ServerCounters:
    requests_ok: int = 0
    requests_failed: int = 0  # refused (400) or aborted by a disconnect
    disconnects: int = 0
    queue_full: int = 0  # refused with 429 (backpressure.py)


class _EngineCollector:
    def __init__(self, engine: Engine, counters: ServerCounters, gate: RequestGate) -> None:
        self.engine = engine
        self.counters = counters
        self.gate = gate

    def collect(self):
        yield from self._counters()
        yield from self._gauges()

    def _counters(self):
        st, c = self.engine.stats, self.counters
        req = CounterMetricFamily("prefixflow_requests", "Requests served", labels=["status"])
        req.add_metric(["ok"], c.requests_ok)
        req.add_metric(["failed"], c.requests_failed)
        yield req
        for name, text, value in (
            ("disconnects", "Requests aborted by a client disconnect", c.disconnects),
            ("queue_full", "Requests refused with 429: the server held its most", c.queue_full),
            ("prompt_tokens", "Prompt tokens", st.prompt_tokens),
            (
                "prompt_tokens_cached",
                "Prompt tokens read from the prefix cache (memory or disk)",
                st.cached_prompt_tokens,
            ),
            (
                "prompt_tokens_from_disk",
                "Of the cached prompt tokens, those read from the KV disk tier",
                st.disk_prompt_tokens,
            ),
            (
                "prompt_tokens_computed",
                "Prompt tokens run through the model (not read from a cache)",
                st.prompt_computed_tokens,
            ),
            (
                "duplicate_requests",
                "Requests answered by the run of an identical unfinished request",
                st.duplicate_requests,
            ),
            ("generation_tokens", "Generated tokens", st.output_tokens),
            ("preemptions", "Preemptions", st.preemptions),
            ("spec_draft_tokens", "Tokens drafted by speculative decoding", st.draft_tokens),
            ("spec_accepted_tokens", "Drafted tokens accepted", st.accepted_tokens),
        ):
            yield CounterMetricFamily(f"prefixflow_{name}", text, value)

    def _gauges(self):
        eng = self.engine
        st, sched, kv = eng.stats, eng.scheduler.make_stats(), eng.scheduler.kv.make_stats()
        reuse = st.cached_prompt_tokens / st.prompt_tokens if st.prompt_tokens else 0.0
        for name, text, value in (
            ("queue_length", "Sequences waiting to start", sched.num_waiting),
            ("running_sequences", "Sequences running", sched.num_running),
            ("unfinished_requests", "Requests in the engine", eng.num_unfinished_requests),
            (
                "server_samples",
                "Samples the server holds, running or queued (max_queued_requests bounds it)",
                self.gate.in_flight,
            ),
            ("weight_version", "Weight updates since start", eng.weight_version),
            ("kv_pages_used", "KV pages in use", kv.num_used_pages),
            ("kv_pages_total", "KV pages", kv.num_pages),
            # The cache is allocated untouched and pages are first written as they are
            # first handed out, so resident memory grows with this up to the KV budget.
            (
                "kv_bytes_touched",
                "Bytes of KV cache written at least once (resident)",
                kv.num_pages_touched * eng.runner.kv_cache_bytes // kv.num_pages,
            ),
            ("kv_utilisation", "KV pages in use / all pages", kv.utilisation),
            (
                "prefix_reuse",
                "Prompt tokens read from the cache (memory or disk) / all prompt tokens",
                reuse,
            ),
        ):
            yield GaugeMetricFamily(f"prefixflow_{name}", text, value)


def metrics_registry(
    engine: Engine, counters: ServerCounters, gate: RequestGate
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(engine, counters, gate))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
