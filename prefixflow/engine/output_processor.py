"""Per-request output work: n-sample fan-out, incremental text, stop strings, logprobs,
and the RequestOutput each caller gets (vLLM v1 keeps this in its output processor too).

The engine feeds it every sampled token after the scheduler's update; it reads the
scheduler's Requests but never writes them. A request that duplicates an unfinished one
gets copies of that one's outputs (duplicates.py). A stop string found in a still-running
sample is handed back, and the engine asks the scheduler to finish it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixflow.engine.detokenizer import IncrementalDetokenizer
from prefixflow.engine.duplicates import Duplicates, duplicate_key
from prefixflow.engine.stop import find_stop_string
from prefixflow.errors import RequestError
from prefixflow.logprob_block import LogprobBlock
from prefixflow.request import CompletionOutput, FinishReason, Logprob, Request, RequestOutput
from prefixflow.sampling_params import SamplingParams
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
    done: CompletionOutput | None = None  # finished before a resume (continue_from)


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputProcessor:
    def __init__(self, codec: TextCodec, dedupe: bool = True) -> None:
        """dedupe: answer a duplicate of an unfinished request from its run (off with
        prefix sharing, so that every request is computed, for comparison)."""
        self.codec = codec
        self._parents: dict[str, _Parent] = {}
        self._sample_of: dict[str, tuple[_Parent, _Sample]] = {}
        self.duplicates = Duplicates(dedupe)

    # ---- requests ----
    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        samples: list[Request | CompletionOutput],
        resume: RequestOutput | None = None,
    ) -> None:
        """samples: the running Requests, and for a resumed partial output (`resume`) the
        samples it had finished, which come back as they were."""
        parent = _Parent(request_id, prompt, prompt_ids, params)
        if params.prompt_logprobs is not None:
            # None for the first position, and for those before logprob_start_len.
            skipped = [None] * max(1, min(params.logprob_start_len, len(prompt_ids)))
            parent.prompt_logprobs = list(resume.prompt_logprobs or skipped) if resume else skipped
        for i, req in enumerate(samples):
            if isinstance(req, CompletionOutput):
                parent.samples.append(_Sample(None, None, None, done=req))  # type: ignore[arg-type]
                continue
            p = req.sampling_params
            s = _Sample(
                req,
                IncrementalDetokenizer(self.codec, p.skip_special_tokens),
                [] if p.logprobs is not None else None,
            )
            if resume is not None:  # carry on from the tokens it generated before
                before = resume.outputs[i]
                for t in before.token_ids:
                    s.detok.add(t)
                s.num_tokens = len(before.token_ids)
                if s.logprobs is not None:
                    s.logprobs = list(before.logprobs or [])
                    s.cumulative_logprob = before.cumulative_logprob or 0.0
            parent.samples.append(s)
            self._sample_of[req.request_id] = (parent, s)
        self._parents[request_id] = parent
        if resume is None:  # duplicates arriving from now on follow it
            self.duplicates.lead(request_id, duplicate_key(prompt, prompt_ids, params))

    def follows(
        self, request_id: str, prompt: str | None, prompt_ids: list[int], params: SamplingParams
    ) -> bool:
        """True if the request duplicates an unfinished one, whose outputs it then gets."""
        return self.duplicates.follow(request_id, duplicate_key(prompt, prompt_ids, params))

    def add_prompt_logprobs(self, entries: dict[str, list[LogprobBlock]]) -> None:
        for sample_id, blocks in entries.items():
            if sample_id not in self._sample_of:
                continue  # aborted
            parent, _ = self._sample_of[sample_id]
            k = parent.params.prompt_logprobs
            for b in blocks:
                for i in range(len(b)):
                    tid, lp, rank, top = b.entry(i, k)
                    parent.prompt_logprobs.append(
                        self._logprob_entry(SampledToken(tid, lp, rank, top))
                    )

    def weights_updated(self, aborted_ids: list[str]) -> list[_Parent]:
        """The weights changed: no request arriving from now on follows one that started
        before. Returns the requests of the samples the update aborted."""
        self.duplicates.close()
        return self.parents_of(aborted_ids)

    def parents_of(self, sample_ids: list[str]) -> list[_Parent]:
        """The requests of these samples (those the engine still tracks)."""
        found = {}
        for sid in sample_ids:
            if sid in self._sample_of:
                parent = self._sample_of[sid][0]
                found[parent.request_id] = parent
        return list(found.values())

    @staticmethod
    def unfinished_samples(parents: list[_Parent]) -> list[str]:
        """The ids of these requests' samples still running."""
        return [
            s.request.request_id
            for p in parents
            for s in p.samples
            if s.done is None and not s.request.is_finished
        ]

    def check_new(self, request_id: str) -> None:
        if request_id in self._parents or request_id in self.duplicates:
            raise RequestError(f"request id {request_id!r} is already in use")

    def leave(self, request_id: str) -> list[str]:
        """The caller left (abort): the ids of the samples the scheduler aborts, none while
        a duplicate still follows the request's run."""
        return [sid for rid in self.duplicates.leave(request_id) for sid in self.remove(rid)]

    def remove(self, request_id: str) -> list[str]:
        """Forget a request; returns its samples' ids (for the scheduler to abort)."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        live = [s.request.request_id for s in parent.samples if s.done is None]
        for sid in live:
            self._sample_of.pop(sid, None)
        return live

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
        return list(ended.values()), stops, self.duplicates.updated(updated)

    def finished(self, ended: list[_Parent]) -> list[RequestOutput]:
        """Outputs of the parents whose samples have all finished (after stops applied)."""
        out = []
        for parent in ended:
            if all(s.done is not None or s.request.is_finished for s in parent.samples):
                self.remove(parent.request_id)
                out.append(self._output(parent, finished=True))
        return self.duplicates.fan_out(out)

    def snapshot(self, request_id: str, partial: bool = False) -> RequestOutput:
        """What an unfinished request has generated so far (finished=False), for streaming,
        or (partial) to hand back unfinished."""
        source = self.duplicates.source(request_id)
        out = self._output(self._parents[source], finished=False, partial=partial)
        return out if source == request_id else self.duplicates.as_follower(out, request_id)

    def _record_logprobs(self, sample: _Sample, tok: SampledToken) -> None:
        if sample.logprobs is None or tok.logprob is None:
            return
        sample.logprobs.append(self._logprob_entry(tok))
        sample.cumulative_logprob += tok.logprob

    def _logprob_entry(self, tok: SampledToken) -> dict[int, Logprob]:
        """The top-k (rank order), then the token itself if not among them."""
        piece = self.codec.piece
        entry = {
            tid: Logprob(lp, rank + 1, piece(tid)) for rank, (tid, lp) in enumerate(tok.top or [])
        }
        entry.setdefault(tok.token_id, Logprob(tok.logprob, tok.rank, piece(tok.token_id)))
        return entry

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

    def _output(self, parent: _Parent, finished: bool, partial: bool = False) -> RequestOutput:
        """partial: an unfinished request handed back (min_finished); its running samples
        get finish_reason "partial"."""
        outputs = []
        for i, s in enumerate(parent.samples):
            if s.done is not None:
                outputs.append(s.done)
                continue
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
            ended = reason is not None and (finished or req.is_finished)
            if partial and not ended:
                reason, ended = FinishReason.PARTIAL, True
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                    logprobs=None if s.logprobs is None else list(s.logprobs),
                    finish_reason=reason.value if ended else None,
                    stop_reason=stop_reason,
                    weight_versions=req.token_versions[: len(token_ids)],
                )
            )
        live = [s.request for s in parent.samples if s.done is None]
        return RequestOutput(
            request_id=parent.request_id,
            prompt=parent.prompt,
            prompt_token_ids=parent.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=live[0].num_cached_tokens if live else 0,
            num_disk_cached_tokens=live[0].num_disk_tokens if live else 0,
            prompt_logprobs=None
            if parent.prompt_logprobs is None
            else list(parent.prompt_logprobs),
            sampling_params=parent.params,
        )
