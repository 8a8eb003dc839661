"""ParamsCache: values the sample side derives from a request's SamplingParams (tensors),
kept while that SamplingParams lives, outside it.

SamplingParams is a plain, unhashable dataclass that travels to the scheduler, the server
and across processes, so it carries no tensors of ours, and a WeakKeyDictionary (which
hashes its keys) cannot hold it. Entries are keyed by identity instead: each keeps a weak
reference to its SamplingParams, whose collection removes the entry, and a lookup checks
that reference, so an id reused by a later object never finds an earlier one's value.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from prefixflow.sampling_params import SamplingParams

V = TypeVar("V")


class ParamsCache(Generic[V]):
    def __init__(self, build: Callable[[SamplingParams], V]) -> None:
        self._build = build
        self._entries: dict[int, tuple[weakref.ref[SamplingParams], V]] = {}

    def __call__(self, params: SamplingParams) -> V:
        """build(params), computed once per SamplingParams object."""
        key = id(params)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is params:
            return entry[1]
        entries = self._entries

        def drop(ref: weakref.ref[SamplingParams]) -> None:
            # Only this entry: another object may hold the id by the time this runs.
            if entries.get(key, (None,))[0] is ref:
                del entries[key]

        value = self._build(params)
        entries[key] = (weakref.ref(params, drop), value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
