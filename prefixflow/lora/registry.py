"""Which adapters the engine holds, by name, and the key each request's KV is filed under.

An adapter's key is a digest of its tensors (model/lora/peft_folder.py computes it), so
the same adapter under two names shares its cached prefixes and a changed adapter never
meets the KV of its old tensors. A request under an adapter carries the key's salt
(`cache_salt`): its page hash chain starts from it, so the radix cache, the planner, the
disk tier and the Ray router keep each adapter's prefixes apart. Pure Python.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from prefixflow import errors
from prefixflow.errors import RequestError


@dataclass
class Adapter:
    name: str
    int_id: int
    path: str
    key: str  # digest of the tensors, in hex
    rank: int
    targets: tuple[str, ...]
    static: bool = False  # loaded at start (lora_modules): never replaced by another
    last_used: int = field(default=0, compare=False)


def cache_salt(key: str | None) -> str:
    """The page hash chain's salt of requests under adapter `key` ("" for the base)."""
    return "" if key is None else f"lora:{key}"


class LoRARegistry:
    """Names -> adapters, at most max_loras at once. When full, a new adapter replaces
    the least recently used one that no unfinished request runs under. The server's
    request threads read it while the engine thread changes it: a lock keeps them apart."""

    def __init__(self, max_loras: int, max_lora_rank: int) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._by_name: dict[str, Adapter] = {}
        self._clock = 0
        self._lock = threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def adapters(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    def get(self, name: str) -> Adapter:
        """The adapter a request names; RequestError (404 on the server) if none."""
        with self._lock:
            adapter = self._by_name.get(name)
            if adapter is not None:
                self._clock += 1
                adapter.last_used = self._clock
        if adapter is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise RequestError(
                f"LoRA adapter {name!r} is not loaded (loaded: {known}); load it with "
                "LLM.generate(lora_request=LoRARequest(name, id, path)), --lora-modules "
                "or POST /v1/load_lora_adapter",
                "model",
                errors.MODEL_NOT_FOUND,
            )
        return adapter

    def check_rank(self, name: str, rank: int) -> None:
        if rank > self.max_lora_rank:
            raise RequestError(
                f"LoRA adapter {name!r} has rank {rank}, above max_lora_rank="
                f"{self.max_lora_rank}; start the engine with max_lora_rank={rank} or more",
                "lora_request",
                errors.INVALID_LORA,
            )

    def make_room(self, in_use: Callable[[str], bool]) -> Adapter | None:
        """Before adding one: if full, drop and return the least recently used adapter
        whose key no unfinished request runs under; RequestError if every one is busy."""
        if len(self._by_name) < self.max_loras:
            return None
        idle = [a for a in self.adapters() if not a.static and not in_use(a.key)]
        if not idle:
            raise RequestError(
                f"max_loras={self.max_loras} adapters are loaded and in use "
                f"({', '.join(sorted(self._by_name))}); raise max_loras or unload one",
                "lora_request",
                errors.INVALID_LORA,
            )
        victim = min(idle, key=lambda a: a.last_used)
        with self._lock:
            del self._by_name[victim.name]
        return victim

    def add(self, adapter: Adapter) -> None:
        with self._lock:
            self._clock += 1
            adapter.last_used = self._clock
            self._by_name[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        adapter = self.get(name)
        with self._lock:
            del self._by_name[name]
        return adapter

    def keys(self) -> set[str]:
        return {a.key for a in self.adapters()}
