"""Messages from the event loop to AsyncEngine's engine thread.

Each is a frozen dataclass the engine thread dispatches on by type. A message the caller
waits on carries its own future, which the engine thread answers with the result or the
engine's error (or EngineDeadError, if the engine thread died before running it).
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

from prefixflow.sampling_params import SamplingParams


def _future() -> concurrent.futures.Future:
    return concurrent.futures.Future()


@dataclass(frozen=True)
class AddRequest:
    """Queue a request in the engine; answered with None, or the engine's refusal."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    text: str | None
    done: concurrent.futures.Future = field(default_factory=_future, compare=False, repr=False)


@dataclass(frozen=True)
class UpdateWeights:
    """Load new weights between two steps; answered with the new weight version."""

    model_path: str
    in_flight: str
    done: concurrent.futures.Future = field(default_factory=_future, compare=False, repr=False)


@dataclass(frozen=True)
class AddLoRA:
    """Load a LoRA adapter folder under a name between two steps; answered with its
    registry entry (Adapter)."""

    lora_name: str
    lora_path: str
    done: concurrent.futures.Future = field(default_factory=_future, compare=False, repr=False)


@dataclass(frozen=True)
class RemoveLoRA:
    """Unload a LoRA adapter by name; answered with None (its running requests finish)."""

    lora_name: str
    done: concurrent.futures.Future = field(default_factory=_future, compare=False, repr=False)


@dataclass(frozen=True)
class Abort:
    """Abort a request; nobody waits for it (a no-op once the request finished)."""

    request_id: str


AnsweredMessage = AddRequest | UpdateWeights | AddLoRA | RemoveLoRA
EngineMessage = AddRequest | UpdateWeights | AddLoRA | RemoveLoRA | Abort
