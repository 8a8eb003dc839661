"""What the engine serves, changed in place: the model's weights (update_weights) and its
LoRA adapters (add, remove, list, update_lora), with the requests in flight handled by
in_flight.py.

The request front's registry (lora/registry.py) names the adapters; the runner keeps their
tensors by key (runner/lora_runner.py). An Engine mixin, so engine.py stays wiring.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prefixflow import errors
from prefixflow.engine.in_flight import check_in_flight, lora_after_update
from prefixflow.errors import RequestError
from prefixflow.lora.registry import Adapter, LoRARegistry, cache_salt
from prefixflow.lora.request import LoRARequest
from prefixflow.request import RequestOutput

if TYPE_CHECKING:
    from prefixflow.engine.engine import Engine

logger = logging.getLogger("prefixflow")


class ModelUpdates:
    """update_weights, add_lora, remove_lora, list_loras, update_lora; mixed into Engine."""

    @property
    def weight_version(self: Engine) -> int:
        return self.scheduler.weight_version

    def update_weights(self: Engine, weights, in_flight: str = "recompute") -> list[RequestOutput]:
        """Load new weights in place (runner/weight_update.py); returns the requests that
        in_flight="abort" finished (only here: step() does not return them again)."""
        check_in_flight(in_flight)
        t0 = time.perf_counter()
        prev = self.scheduler.weight_version
        keep_old = in_flight == "keep" and prev in self.scheduler.versions_in_use()
        self.runner.update_weights(weights, prev + 1, keep_old)
        aborted = self.scheduler.update_weights(in_flight)
        dt = time.perf_counter() - t0
        logger.info(f"weights updated to v{self.weight_version} in {dt:.2f}s ({in_flight})")
        return self._finish_aborted(aborted)

    def _finish_aborted(self: Engine, aborted: list) -> list[RequestOutput]:
        parents = self.output.weights_updated([r.request_id for r in aborted])
        for sample_id in self.output.unfinished_samples(parents):  # without sharing, its others
            self.scheduler.abort(sample_id)
        return self.output.finished(parents)

    def _registry(self: Engine) -> LoRARegistry:
        if self.front.loras is None or self.runner.lora is None:
            raise RequestError(
                "this engine serves no LoRA adapters; start it with enable_lora=True "
                "(--enable-lora) or lora_modules",
                "lora_request",
                errors.INVALID_LORA,
            )
        return self.front.loras

    def add_lora(self: Engine, lora: LoRARequest, static: bool = False) -> Adapter:
        """Load an adapter under its name (again: nothing to do). Raises RequestError:
        a missing folder, a rank above max_lora_rank, another base model's shapes."""
        registry = self._registry()
        if lora.lora_name in (self.model_name, self.front.source.name):
            raise RequestError(
                f"a LoRA adapter may not be named {lora.lora_name!r}, the base model's name: "
                "requests naming it run the base model",
                "lora_name",
                errors.INVALID_LORA,
            )
        if lora.lora_name in registry:
            adapter = registry.get(lora.lora_name)
            if lora.lora_path and _same_path(lora.lora_path, adapter.path):
                return adapter
            if lora.lora_path:
                raise RequestError(
                    f"LoRA adapter {lora.lora_name!r} is loaded from {adapter.path}; unload it "
                    "first, or replace its tensors with update_lora",
                    "lora_name",
                    errors.INVALID_LORA,
                )
            return adapter
        if not lora.lora_path:
            return registry.get(lora.lora_name)  # not loaded: says how to load it
        tensors = self.runner.lora.load(lora.lora_name, lora.lora_path, registry)
        try:
            registry.make_room(self._lora_in_use)
        except RequestError:
            self._drop_unused_loras()
            raise
        adapter = Adapter(
            lora.lora_name,
            lora.lora_int_id,
            os.fspath(lora.lora_path),
            tensors.key,
            tensors.rank,
            tensors.modules,
            static,
        )
        registry.add(adapter)
        self._drop_unused_loras()
        logger.info(
            "LoRA adapter %s loaded (rank %d, %s)",
            adapter.name,
            adapter.rank,
            ", ".join(adapter.targets),
        )
        return adapter

    def load_lora_modules(self: Engine) -> None:
        """The adapters of the lora_modules option, loaded for good (never replaced)."""
        for i, (name, path) in enumerate(self.config.lora_modules, 1):
            self.add_lora(LoRARequest(name, i, path), static=True)

    def remove_lora(self: Engine, name: str) -> None:
        """Unload an adapter; requests already running under it finish under it."""
        self._registry().remove(name)
        self._drop_unused_loras()

    def list_loras(self: Engine) -> list[LoRARequest]:
        if self.front.loras is None:
            return []
        return [LoRARequest(a.name, a.int_id, a.path) for a in self.front.loras.adapters()]

    def update_lora(
        self: Engine,
        name: str,
        weights: Mapping[str, Any] | str | os.PathLike,
        in_flight: str = "recompute",
    ) -> list[RequestOutput]:
        """Replace an adapter's tensors in place (RL that trains only an adapter):
        all of its A and B tensors by PEFT's names, or a folder. Only this adapter's
        cached KV is dropped (unless another name holds the same tensors); its requests
        in flight follow `in_flight`, as in update_weights, and those of another name of
        the same tensors keep them. Returns the requests in_flight="abort" finished."""
        check_in_flight(in_flight)
        registry = self._registry()
        adapter = registry.get(name)
        old = adapter.key
        if isinstance(weights, Mapping):
            cfg, modules = self.runner.lora.configs[old], self.runner.lora.modules[old]
            tensors = self.runner.lora.load(name, weights, registry, cfg)
            if set(tensors.pairs) != modules:
                self._drop_unused_loras()
                raise RequestError(
                    f"update_lora({name!r}) by tensors takes all of the adapter's A and B "
                    f"({len(modules)} modules, PEFT's names); got {len(tensors.pairs)}",
                    "weights",
                    errors.INVALID_LORA,
                )
        else:
            tensors = self.runner.lora.load(name, weights, registry)
            adapter.path = os.fspath(weights)
        if tensors.key == old:
            return []
        adapter.key, adapter.rank, adapter.targets = tensors.key, tensors.rank, tensors.modules
        if old not in registry.keys():  # no other name holds the old tensors
            self.scheduler.kv.forget_salt(cache_salt(old))
        aborted = lora_after_update(self.scheduler, name, old, tensors.key, in_flight)
        self._drop_unused_loras()
        logger.info("LoRA adapter %s updated (in flight: %s)", name, in_flight)
        return self._finish_aborted(aborted)

    def _lora_in_use(self: Engine, key: str) -> bool:
        return any(r.lora_key == key for r in self.scheduler.requests.values())

    def _drop_unused_loras(self: Engine) -> None:
        in_use = {r.lora_key for r in self.scheduler.requests.values()}
        self.runner.lora.keep_only(self.front.loras.keys() | in_use)


def _same_path(a: str | os.PathLike, b: str) -> bool:
    """One folder however written (dir, dir/, ./dir); a Hub id as written."""
    return os.path.realpath(os.fspath(a)) == os.path.realpath(b) or os.fspath(a) == b
