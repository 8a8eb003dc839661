"""Prompt logprobs kept with cached pages (cache/page_logprobs.py), under the real scheduler
and the page-table runner, whose entries depend on the context they were computed from:
every request gets each prompt position's entry once, equal to a cold computation, however
much of it came from the cache, RAM or disk, after eviction, preemption or a weight update.
"""

from __future__ import annotations

import random

import pytest

from prefixflow.cache.disk_tier import DiskTier
from prefixflow.cache.page_file import decode, encode
from prefixflow.cache.page_logprobs import PageLogprobs
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from prefixflow.logprob_block import LogprobBlock
from prefixflow.request import Request
from prefixflow.sampling_params import SamplingParams
from tests.page_table_runner import FAKE_K, PageTableRunner, fake_entry

P = 4  # page size


def cold(prompt: list[int], first: int = 1) -> list[tuple]:
    return [(prompt[p], *fake_entry(prompt[:p], prompt[p])) for p in range(first, len(prompt))]


def entries(blocks: list[LogprobBlock]) -> tuple[int | None, list[tuple]]:
    """(first position, entries), checking the blocks are consecutive."""
    if not blocks:
        return None, []
    out, at = [], blocks[0].first
    for b in blocks:
        assert b.first == at, "a position skipped or returned twice"
        out += [b.entry(i, FAKE_K) for i in range(len(b))]
        at = b.end
    return blocks[0].first, out


def eval_batch(seed: int, questions: int = 6, choices: int = 4) -> list[tuple[str, list[int]]]:
    """A few-shot header, then each question's choices: the shape of a multiple-choice
    evaluation (lm-eval scores each choice as a request of its own)."""
    rng = random.Random(seed)
    header = [rng.randrange(1, 500) for _ in range(6 * P + 1)]
    out = []
    for q in range(questions):
        question = [rng.randrange(1, 500) for _ in range(rng.randint(1, 3 * P))]
        for c in range(choices):
            choice = [rng.randrange(1, 500) for _ in range(rng.randint(1, 3))]
            out.append((f"q{q}c{c}", header + question + choice))
    return out


class Run:
    def __init__(self, num_pages: int = 256, budget: int = 32, disk: DiskTier | None = None):
        self.pool = PagePool(num_pages, P)
        config = SchedulerConfig(
            max_num_batched_tokens=budget, watermark=0.0, admission="aggressive"
        )
        self.sched = Scheduler(config, self.pool, disk)
        self.runner = PageTableRunner(self.pool)
        self.disk = disk
        self.got: dict[str, list[LogprobBlock]] = {}
        self.reqs: dict[str, Request] = {}

    def add(self, rid: str, prompt: list[int], lp: int | None = 1, start: int = 0, **kw) -> None:
        params = SamplingParams(
            max_tokens=kw.pop("max_tokens", 1),
            ignore_eos=True,
            prompt_logprobs=lp,
            logprob_start_len=start,
        )
        req = Request(rid, prompt, params)
        req.num_prompt_logprobs = max(0, start - 1)  # as the request front sets it
        self.runner.track(req)
        self.sched.add(req)
        self.reqs[rid] = req

    def run(self, steps: int | None = None) -> None:
        n = 0
        while self.sched.has_unfinished() and (steps is None or n < steps):
            out = self.sched.schedule()
            result = self.runner.execute(out)
            for rid, blocks in self.sched.kv.step_logprobs(out, result).items():
                self.got.setdefault(rid, []).extend(blocks)
            if self.disk is not None:
                self.sched.kv.save_pages(result.saved_pages)
            self.sched.update(out, result)
            n += 1

    def check(self, prompts: dict[str, list[int]], start: int = 1) -> None:
        for rid, prompt in prompts.items():
            first, got = entries(self.got.get(rid, []))
            assert got == cold(prompt, start), rid
            assert first in (None, start)


def trie_minimum(prompts: list[list[int]]) -> int:
    """Distinct prefixes: the tokens a perfect prefix cache computes."""
    return len({tuple(p[: i + 1]) for p in prompts for i in range(len(p))})


@pytest.mark.parametrize("seed", range(3))
def test_an_evaluation_scores_each_shared_prefix_once(seed):
    batch = eval_batch(seed)
    r = Run()
    for rid, prompt in batch:
        r.add(rid, prompt)
    r.run()
    r.check(dict(batch))
    computed, minimum = r.sched.num_prompt_computed_tokens, trie_minimum([p for _, p in batch])
    assert computed <= 1.02 * minimum + P * len(batch)
    assert sum(q.num_cached_tokens for q in r.reqs.values()) > 0


def test_without_prefix_sharing_every_position_is_computed_cold():
    batch = dict(eval_batch(0, questions=2))
    pool = PagePool(256, P)
    config = SchedulerConfig(max_num_batched_tokens=32, prefix_sharing=False)
    r = Run()
    r.pool, r.sched, r.runner = pool, Scheduler(config, pool), PageTableRunner(pool)
    for rid, prompt in batch.items():
        r.add(rid, prompt)
    r.run()
    r.check(batch)


def test_a_prefix_cached_without_logprobs_is_recomputed_once_then_read():
    """A plain request caches the header without logprobs: the first scoring request
    misses there and enters its own pages with them, replacing the plain ones; the next
    reads them."""
    batch = eval_batch(1, questions=1, choices=3)
    header = batch[0][1][: 6 * P + 1]
    r = Run()
    r.add("plain", header + [7, 7, 7], lp=None, max_tokens=4)
    r.run()
    for rid, prompt in batch:
        r.add(rid, prompt)
        r.run()  # one at a time: each starts from what the one before left
    r.check(dict(batch))
    first, second, third = (r.reqs[rid] for rid, _ in batch)
    assert first.num_cached_tokens == 0  # the plain pages carry no logprobs
    assert second.num_cached_tokens >= 6 * P and third.num_cached_tokens >= 6 * P


def test_logprob_start_len_reads_a_plain_prefix_before_it():
    """Only the tail after the header is asked for: the header's plain pages serve."""
    batch = eval_batch(2, questions=1, choices=2)
    start = 6 * P + 1
    r = Run()
    r.add("plain", batch[0][1][:start] + [9], lp=None)
    r.run()
    for rid, prompt in batch:
        r.add(rid, prompt, start=start)
    r.run()
    r.check(dict(batch), start=start)
    assert all(r.reqs[rid].num_cached_tokens == 6 * P for rid, _ in batch)


def test_readers_admitted_in_the_step_that_computes_the_pages():
    """A large budget: the choices after the first are admitted in the step whose chunk
    completes the shared pages, read them PENDING, and take the first row after them
    from the computing sequence's row in that step."""
    batch = eval_batch(3, questions=1, choices=4)
    r = Run(budget=512)
    for rid, prompt in batch:
        r.add(rid, prompt)
    r.run(steps=1)
    assert len(r.got) == 4  # all four ran in the first step
    r.run()
    r.check(dict(batch))
    assert sorted(q.num_cached_tokens > 0 for q in r.reqs.values()) == [False, True, True, True]


@pytest.mark.parametrize("num_pages", [14, 20])
def test_eviction_and_preemption_under_a_small_cache(num_pages):
    batch = eval_batch(4, questions=4)
    r = Run(num_pages=num_pages, budget=16)
    for rid, prompt in batch:
        r.add(rid, prompt, max_tokens=6)
    r.run()
    r.check(dict(batch))
    assert r.pool.num_free == r.pool.num_pages


def test_a_weight_update_drops_the_stored_logprobs():
    batch = eval_batch(5, questions=1, choices=2)
    r = Run()
    r.add(*batch[0])
    r.run()
    r.sched.update_weights("recompute")
    r.add(*batch[1])
    r.run()
    r.check(dict(batch))
    assert r.reqs[batch[1][0]].num_cached_tokens == 0


def test_pages_keep_their_logprobs_through_the_disk_tier(tmp_path):
    batch = eval_batch(6, questions=2)
    nbytes = P * 8  # the page-table runner's page: its token ids as int64

    def run_once(prompts, k: int = FAKE_K) -> Run:
        disk = DiskTier(tmp_path, 1 << 30, nbytes)
        disk.logprob_k = k  # the alternatives the runner keeps (max_logprobs)
        r = Run(disk=disk)
        for rid, prompt in prompts:
            r.add(rid, prompt)
        r.run()
        r.disk.flush()
        return r

    first = run_once(batch)
    first.check(dict(batch))
    second = run_once(batch)  # a new process: its RAM cache empty, the folder full
    second.check(dict(batch))
    from_disk = sum(q.num_disk_tokens for q in second.reqs.values())
    assert from_disk > 0
    assert second.sched.num_prompt_computed_tokens < first.sched.num_prompt_computed_tokens
    # An engine keeping more alternatives than the pages were saved with reads none of
    # their logprobs (they would come back cut short): it computes the prompts again.
    third = run_once(batch, k=FAKE_K + 3)
    assert sum(q.num_disk_tokens for q in third.reqs.values()) == 0
    assert third.sched.num_prompt_computed_tokens == first.sched.num_prompt_computed_tokens


def test_a_page_file_keeps_logprobs_bit_for_bit(tmp_path):
    import numpy as np

    block = LogprobBlock.empty(4, 2)
    for i in range(4):
        block.token_ids.append(100 + i)
        block.logprobs.append(-0.1 * i)
        block.ranks.append(i + 1)
        block.top_ids.extend([i, i + 1])
        block.top_logprobs.extend([-0.01 * i, -0.02 * i])
    lp = PageLogprobs(block, b"\x01\x02\x03\x04")
    data = np.arange(32, dtype=np.uint8)
    path = tmp_path / "page.safetensors"
    key = "ab" * 16
    path.write_bytes(encode("cd" * 16, key, data, lp))
    got_data, got_lp = decode(path, "cd" * 16, key, 32)
    assert np.array_equal(got_data, data)
    assert got_lp == lp
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # the hidden state's last byte
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="checksum"):
        decode(path, "cd" * 16, key, 32)


def test_block_slices_and_concatenates():
    b = LogprobBlock.empty(3, 1)
    for i in range(5):
        b.token_ids.append(i)
        b.logprobs.append(-i)
        b.ranks.append(1)
        b.top_ids.append(i)
        b.top_logprobs.append(-i)
    left, right = b.slice(0, 5), b.slice(5, 100)
    assert (left.first, len(left), right.first, len(right)) == (3, 2, 5, 3)
    assert LogprobBlock.concat([left, right]) == b
    with pytest.raises(ValueError):
        LogprobBlock.concat([right, left])


def test_replacing_a_plain_prefix_keeps_what_was_cached_below_it():
    """A tail scorer caches its pages (with logprobs) below the plain header; a full
    scorer then replaces the header's pages with its own; the pages below stay cached,
    and another tail scorer of the same prompt reads them all."""
    batch = eval_batch(7, questions=1, choices=1)
    rid, prompt = batch[0]
    start = 6 * P + 1
    r = Run()
    r.add("plain", prompt[:start] + [9], lp=None)
    r.run()
    r.add("tail", prompt, start=start)
    r.run()
    r.add("full", prompt)
    r.run()
    r.add("tail2", prompt, start=start)
    r.run()
    r.check({"tail": prompt, "tail2": prompt}, start=start)
    r.check({"full": prompt})
    assert r.reqs["full"].num_cached_tokens == 0  # the header carried no logprobs
    assert r.reqs["tail2"].num_cached_tokens == (len(prompt) - 1) // P * P
