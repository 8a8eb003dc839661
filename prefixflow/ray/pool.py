"""ReplicaPool: N engine replicas as Ray actors, driven like one Engine.

It offers what `run-batch` asks of an Engine (add_request, step, abort, has_unfinished,
stats, codec), so the driver alone reads the input and writes the output: resume,
per-line errors, --ordered and --report behave as in one process. The driver tokenizes,
checks each request as the engine would, and routes it (router.py). Each replica steps on
its own; `step()` returns what any replica finished. A replica that dies (its actor
killed, its process crashed) is dropped and its unfinished requests go to the others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

from prefixflow.cache.kv_manager import require_fits
from prefixflow.config import EngineConfig
from prefixflow.engine.stats import EngineStats
from prefixflow.inputs.request_front import RequestFront
from prefixflow.ray.replica import Replica
from prefixflow.ray.router import PrefixRouter
from prefixflow.request import Request, RequestOutput
from prefixflow.sampling_params import SamplingParams

logger = logging.getLogger("prefixflow")

NAMESPACE = "prefixflow"  # replicas are named actors here: replica-<driver pid>-<index>


@dataclass
class _Queued:
    rid: str
    ids: list[int]
    params: SamplingParams
    text: str | None


class ReplicaPool:
    def __init__(
        self,
        config: EngineConfig,
        num_replicas: int,
        address: str | None = None,
        routing: str = "prefix",
    ) -> None:
        import ray

        # The driver checks each request as a replica's engine would, so a bad line fails
        # alone here.
        self.front = RequestFront.from_config(config)
        self.model_name, self.codec = self.front.model_name, self.front.codec
        if address is None:
            ray.init(include_dashboard=False, namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.cpus_per_replica = max(1, cpus // num_replicas)
        actor = ray.remote(Replica)
        self._actors = [
            actor.options(
                num_cpus=self.cpus_per_replica,
                name=f"replica-{os.getpid()}-{i}",
                max_restarts=0,
            ).remote(config.options(), self.cpus_per_replica)
            for i in range(num_replicas)
        ]
        infos = []
        for i, a in enumerate(self._actors):
            try:
                infos.append(ray.get(a.info.remote()))
            except Exception as e:  # noqa: BLE001 - any failure to start is reported the same
                raise RuntimeError(
                    f"replica {i} of {num_replicas} could not start: {e}; check the model "
                    "path and that the Ray cluster has the memory for every replica"
                ) from e
        self.load_seconds = max(info["load_seconds"] for info in infos)
        self._kv_tokens = min(info["kv_tokens"] for info in infos)
        self.page_size = infos[0]["page_size"]
        self.front.limit_context(min(info["max_model_len"] for info in infos))
        for adapter in infos[0]["loras"]:  # lora_modules, loaded by every replica alike
            self.front.loras.add(adapter)
        # The smallest replica's cache bounds n and a request's tokens, as in each replica.
        self.front.set_kv_budget(self._kv_tokens // self.page_size, self.page_size)
        self.router = PrefixRouter(num_replicas, self.page_size, policy=routing)
        self._queued: list[list[_Queued]] = [[] for _ in range(num_replicas)]
        self._in_flight: list[dict[str, _Queued]] = [{} for _ in range(num_replicas)]
        self._calls: dict = {}  # replica -> its outstanding step() call
        self._stats = [EngineStats() for _ in range(num_replicas)]
        self.completed = [0] * num_replicas  # requests each replica finished
        self.reassigned = 0  # requests moved off a replica that died

    # ---- what run-batch asks of an engine ----
    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
    ) -> None:
        prompt_text, ids = self.front.prompt(list(prompt), params, prompt_text)
        probe = Request(request_id, ids, params, max_model_len=self.front.max_model_len)
        require_fits(probe, self._kv_tokens, "a replica's cache")
        self._queue(_Queued(request_id, ids, params, prompt_text))

    def abort(self, request_id: str) -> None:
        for r, queued in enumerate(self._queued):
            self._queued[r] = [q for q in queued if q.rid != request_id]
        for r, running in enumerate(self._in_flight):
            if running.pop(request_id, None) is not None:
                self.router.done(r)
                self._actors[r].abort.remote([request_id])

    def replica_counts(self) -> tuple[list[int], int]:
        return list(self.completed), self.reassigned

    def has_unfinished(self) -> bool:
        return any(self._queued) or any(self._in_flight)

    def step(self) -> list[RequestOutput]:
        """Wait for any replica to finish a round of steps; return what it finished."""
        import ray
        from ray.exceptions import RayActorError

        self._send_queued()
        for r, running in enumerate(self._in_flight):
            if running and r not in self._calls and self.router.alive[r]:
                self._calls[r] = self._actors[r].step.remote()
        if not self._calls:
            return []
        replica_of = {ref: r for r, ref in self._calls.items()}
        ready, _ = ray.wait(list(replica_of), num_returns=1)
        out: list[RequestOutput] = []
        for ref in ready:
            r = replica_of[ref]
            del self._calls[r]
            try:
                done, stats = ray.get(ref)
            except RayActorError as e:
                self._died(r, e)
                continue
            self._stats[r] = EngineStats(**stats)
            for o in done:
                if self._in_flight[r].pop(o.request_id, None) is not None:
                    self.router.done(r)
                    self.completed[r] += 1
                    out.append(o)
        return out

    @property
    def stats(self) -> EngineStats:
        """Every replica's counters summed (a dead one's as it last reported them)."""
        total = EngineStats()
        for st in self._stats:
            for f in fields(EngineStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(st, f.name))
        return total

    def shutdown(self) -> None:
        import ray

        for a in self._actors:  # their disk tiers finish writing (a dead one has nothing)
            try:
                ray.get(a.flush.remote(), timeout=60)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        for a in self._actors:
            ray.kill(a)
        ray.shutdown()

    # ---- internals ----
    def _queue(self, q: _Queued) -> None:
        # Replicas load the same adapters (lora_modules): the name keys its prefixes.
        lora = q.params.lora_name
        r = self.router.route(q.ids, f"lora-name:{lora}" if lora else "")
        self._queued[r].append(q)

    def _send_queued(self) -> None:
        for r, queued in enumerate(self._queued):
            if not queued:
                continue
            self._queued[r] = []
            self._actors[r].add.remote([(q.rid, q.ids, q.params, q.text) for q in queued])
            for q in queued:
                self._in_flight[r][q.rid] = q

    def _died(self, r: int, error: Exception) -> None:
        lost = list(self._in_flight[r].values()) + self._queued[r]
        self._in_flight[r], self._queued[r] = {}, []
        self.router.dead(r)
        if not any(self.router.alive):
            raise RuntimeError(
                f"every replica died (the last: {error}); rerun the same command to resume"
            )
        logger.warning(
            "replica %d died (%s); its %d unfinished requests go to the others",
            r,
            type(error).__name__,
            len(lost),
        )
        self.reassigned += len(lost)
        for q in lost:
            self._queue(q)
