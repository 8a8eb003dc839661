"""Per-request output work: n-sample fan-out, incremental text, stop strings, logprobs,
and the RequestOutput each caller gets (vLLM v1 keeps this in its output processor too).

The engine feeds it every sampled token after the scheduler's update; it reads the
scheduler's Requests but never writes them. A stop string found in a still-running
sample is handed back, and the engine asks the scheduler to finish it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixflow.engine.detokenizer import IncrementalDetokenizer
from prefixflow.engine.stop import find_stop_string
from prefixflow.request import CompletionOutput, FinishReason, Logprob, Request, RequestOutput
from prefixflow.step import SampledToken
from prefixflow.tokenizer import TextCodec


@dataclass
class _Sample:
    """What is kept of one of a request's n samples while it runs."""

    request: Request
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float = 0.0
    stop: str | None = None  # the stop string that ended it
    num_tokens: int = 0  # output tokens taken so far
    text_end: int | None = None  # where the output text ends, once it stopped


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_Sample] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, codec: TextCodec) -> None:
        self.codec = codec
        self._parents: dict[str, _Parent] = {}
        self._sample_of: dict[str, tuple[_Parent, _Sample]] = {}

    # ---- requests ----
    def add(
        self, request_id: str, prompt: str | None, prompt_ids: list[int], samples: list[Request]
    ) -> None:
        parent = _Parent(request_id, prompt, prompt_ids)
        for req in samples:
            p = req.sampling_params
            s = _Sample(
                req,
                IncrementalDetokenizer(self.codec, p.skip_special_tokens),
                [] if p.logprobs is not None else None,
            )
            parent.samples.append(s)
            self._sample_of[req.request_id] = (parent, s)
        self._parents[request_id] = parent

    def remove(self, request_id: str) -> list[str]:
        """Forget a request; returns its samples' ids (for the scheduler to abort)."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        for s in parent.samples:
            self._sample_of.pop(s.request.request_id, None)
        return [s.request.request_id for s in parent.samples]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._parents

    def __len__(self) -> int:
        return len(self._parents)

    # ---- tokens ----
    def process(
        self, events: list[tuple[Request, SampledToken]]
    ) -> tuple[list[RequestOutput], list[tuple[str, str, int]], set[str]]:
        """Take a step's sampled tokens.

        Returns the outputs of requests that finished, the (sample id, stop string, output
        tokens up to the stop) the scheduler must finish because a stop string appeared,
        and the ids of requests with new tokens. Tokens a sample got after its stop string
        in the same step (speculation appends several) are not taken.
        """
        ended: dict[str, _Parent] = {}
        stops: list[tuple[str, str, int]] = []
        updated: set[str] = set()
        for req, tok in events:
            parent, sample = self._sample_of[req.request_id]
            if sample.stop is not None:
                continue
            sample.num_tokens += 1
            updated.add(parent.request_id)
            self._record_logprobs(sample, tok)
            before = len(sample.detok.text)
            sample.detok.add(tok.token_id)
            p = req.sampling_params
            # vLLM: no stop string before min_tokens, and none after a stop token or EOS.
            if p.stop and req.finish_reason in (None, FinishReason.LENGTH):
                if sample.num_tokens >= p.min_tokens and self._check_stop(sample, before):
                    if not req.is_finished:
                        stops.append((req.request_id, sample.stop, sample.num_tokens))
            if req.is_finished or sample.stop is not None:
                ended[parent.request_id] = parent
        return list(ended.values()), stops, updated

    def finished(self, ended: list[_Parent]) -> list[RequestOutput]:
        """Outputs of the parents whose samples have all finished (after stops applied)."""
        out = []
        for parent in ended:
            if all(s.request.is_finished for s in parent.samples):
                self.remove(parent.request_id)
                out.append(self._output(parent, finished=True))
        return out

    def snapshot(self, request_id: str) -> RequestOutput:
        """What an unfinished request has generated so far (finished=False), for streaming."""
        return self._output(self._parents[request_id], finished=False)

    def _record_logprobs(self, sample: _Sample, tok: SampledToken) -> None:
        if sample.logprobs is None or tok.logprob is None:
            return
        piece = self.codec.piece
        entry = {
            tid: Logprob(lp, rank + 1, piece(tid)) for rank, (tid, lp) in enumerate(tok.top or [])
        }
        entry.setdefault(tok.token_id, Logprob(tok.logprob, tok.rank, piece(tok.token_id)))
        sample.logprobs.append(entry)
        sample.cumulative_logprob += tok.logprob

    @staticmethod
    def _check_stop(sample: _Sample, before: int) -> bool:
        """A stop string ending in the text this step added; records where the text ends."""
        stops = sample.request.sampling_params.stop
        text = sample.detok.text
        if len(text) == before:
            return False
        longest = max(len(s) for s in stops)
        hit = find_stop_string(text, stops, search_from=max(0, before - longest + 1))
        if hit is None:
            return False
        idx, stop = hit
        keep = len(stop) if sample.request.sampling_params.include_stop_str_in_output else 0
        sample.stop = stop
        sample.text_end = idx + keep
        return True

    def _output(self, parent: _Parent, finished: bool) -> RequestOutput:
        outputs = []
        for i, s in enumerate(parent.samples):
            req = s.request
            p = req.sampling_params
            text = s.detok.text
            token_ids = req.output_token_ids
            reason, stop_reason = req.finish_reason, req.stop_reason
            if s.stop is not None:
                text = text[: s.text_end]
                token_ids = token_ids[: s.num_tokens]  # not what a step added after it
                reason, stop_reason = FinishReason.STOP, s.stop
            elif reason == FinishReason.STOP and not p.include_stop_str_in_output:
                text = text[: s.detok.text_before_last]  # EOS or a stop token: not output
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=None if s.logprobs is None else list(s.logprobs),
                    finish_reason=reason.value
                    if reason and (finished or req.is_finished)
                    else None,
                    stop_reason=stop_reason,
                )
            )
        first = parent.samples[0].request
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens,
        )
