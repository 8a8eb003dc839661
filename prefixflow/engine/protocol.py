"""BatchEngine: what run-batch drives, whether one Engine or a ReplicaPool of them on Ray."""

from __future__ import annotations

from typing import Protocol

from prefixflow.engine.stats import EngineStats
from prefixflow.inputs.request_front import RequestFront
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams
from prefixflow.tokenizer import TextCodec


class BatchEngine(Protocol):
    model_name: str
    codec: TextCodec  # what the requests are tokenized and the outputs detokenized with
    load_seconds: float
    front: RequestFront  # what a request may ask (its limits)

    @property
    def stats(self) -> EngineStats: ...

    def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        prompt_text: str | None = None,
    ) -> None:
        """Queue a request, or raise RequestError (nothing queued) if it cannot run."""

    def step(self) -> list[RequestOutput]:
        """Run until some work is done; the requests that finished."""

    def abort(self, request_id: str) -> None: ...

    def has_unfinished(self) -> bool: ...

    def replica_counts(self) -> tuple[list[int], int] | None:
        """Requests each replica finished, and those moved off a dead one (None: one engine)."""
