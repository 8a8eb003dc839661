"""One engine replica, as a Ray actor: it adds requests, steps, and hands back finished
outputs and its counters. The driver (pool.py) routes, collects and writes."""

from __future__ import annotations

import dataclasses
import os
import time

from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams

# A call to step() runs engine steps for about this long, so a round trip to the driver
# costs little against the work, and finished requests still come back promptly.
_STEP_SECONDS = 0.25


class Replica:
    def __init__(self, options: dict, num_cpus: int) -> None:
        # The CPUs Ray gave this actor, and no more (torch would take every core).
        import torch

        torch.set_num_threads(max(1, num_cpus))
        os.environ["OMP_NUM_THREADS"] = str(max(1, num_cpus))
        from prefixflow.config import EngineConfig
        from prefixflow.engine.engine import Engine

        self.engine = Engine(EngineConfig.from_options(**options))
        self.pid = os.getpid()

    def info(self) -> dict:
        eng = self.engine
        kv = eng.scheduler.kv.pool
        return {
            "pid": self.pid,
            "load_seconds": eng.load_seconds,
            "kv_tokens": kv.num_pages * kv.page_size,
            "page_size": kv.page_size,
            "max_model_len": eng.max_model_len,
            "loras": eng.front.loras.adapters() if eng.front.loras is not None else [],
        }

    def add(self, requests: list[tuple[str, list[int], SamplingParams, str | None]]) -> None:
        for rid, ids, params, text in requests:
            self.engine.add_request(rid, ids, params, prompt_text=text)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.engine.abort(rid)

    def flush(self) -> None:
        self.engine.flush_kv_disk()

    def step(self) -> tuple[list[RequestOutput], dict]:
        """Steps for up to _STEP_SECONDS; the requests that finished, and the counters."""
        eng = self.engine
        done: list[RequestOutput] = []
        t0 = time.perf_counter()
        while eng.has_unfinished() and time.perf_counter() - t0 < _STEP_SECONDS:
            done += eng.step()
        return done, dataclasses.asdict(eng.stats)
