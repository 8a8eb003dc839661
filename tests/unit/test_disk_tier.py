"""The KV disk tier on its own (files, checks, the size bound, two processes) and under the
scheduler with the page-table runner, whose pages hold token ids: a page read from disk
that is not the prefix it claims to be shows up as a wrong context."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from prefixflow.cache.disk_tier import DiskTier, page_keys
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from prefixflow.request import Request
from prefixflow.sampling_params import SamplingParams
from tests.page_table_runner import PageTableRunner, ideal_prompt_tokens

NBYTES = 4096


def tier(
    root: Path, max_bytes: int = 1 << 30, fingerprint: str = "model-a", nbytes: int = NBYTES
) -> DiskTier:
    t = DiskTier(root, max_bytes, nbytes)
    t.set_fingerprint(fingerprint)
    return t


def page(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, NBYTES, dtype=np.uint8)


def test_a_key_names_the_whole_prefix_up_to_its_page():
    a = page_keys(list(range(12)), 4, 3, "m")
    assert a == page_keys(list(range(12)) + [99], 4, 3, "m")
    b = page_keys([7] + list(range(1, 12)), 4, 3, "m")  # first page differs: every key does
    assert all(x != y for x, y in zip(a, b, strict=True))
    c = page_keys(list(range(8)) + [0, 9, 10, 11], 4, 3, "m")  # only the last page differs
    assert a[:2] == c[:2] and a[2] != c[2]
    assert set(a).isdisjoint(page_keys(list(range(12)), 4, 3, "another model"))


def test_pages_come_back_as_written_and_missing_ones_are_none(tmp_path):
    t = tier(tmp_path)
    keys = page_keys(list(range(32)), 4, 8, t.fingerprint)
    assert t.wants(keys[0]) and not t.wants(keys[0])  # asked once per page
    t.save(keys[0], page(0))
    t.flush()
    again = tier(tmp_path)  # another process's view
    assert np.array_equal(again.read(keys[0]), page(0))
    assert again.read(keys[1]) is None
    assert again.count_present(keys) == 1
    assert tier(tmp_path, fingerprint="model-b").count_present(keys) == 0


def _corrupt_each_way(path: Path, tmp_path: Path, key: str) -> list[str]:
    """Five bad copies of a good page file at `path`; returns what each one is."""
    good = path.read_bytes()
    cases = []
    for what, make in [
        ("truncated", lambda: path.write_bytes(good[: len(good) // 2])),
        (
            "a byte flipped",
            lambda: path.write_bytes(good[:-10] + bytes([good[-10] ^ 1]) + good[-9:]),
        ),
        ("garbage", lambda: path.write_bytes(b"not a safetensors file")),
        (
            "another model's",
            lambda: save_file(
                {"kv": page(0)},
                path,
                {
                    "format": "prefixflow-kv-page",
                    "fingerprint": "model-b",
                    "key": key,
                    "crc32": "0",
                },
            ),
        ),
        ("wrong size", lambda: save_file({"kv": page(0)[:100]}, path)),
    ]:
        make()
        cases.append(what)
        yield what
    path.write_bytes(good)


def test_torn_corrupt_or_foreign_files_are_refused_and_removed(tmp_path):
    t = tier(tmp_path)
    (key,) = page_keys(list(range(4)), 4, 1, t.fingerprint)
    t.save(key, page(0))
    t.flush()
    path = next(tmp_path.rglob("*.safetensors"))
    bad = 0
    for what in _corrupt_each_way(path, tmp_path, key):
        reader = tier(tmp_path)
        assert reader.read(key) is None, what
        assert not path.exists(), what  # deleted: the next write replaces it
        bad += reader.stats.bad_files
    assert bad == 5
    assert np.array_equal(tier(tmp_path).read(key), page(0))


def test_the_folder_stays_under_its_bound_dropping_least_recently_used(tmp_path):
    file_size = NBYTES + 400  # the page and the safetensors header
    t = tier(tmp_path, max_bytes=10 * file_size)
    keys = page_keys(list(range(4 * 40)), 4, 40, t.fingerprint)
    for i in range(3):
        t.save(keys[i], page(i))
    t.flush()
    for i in range(3, 40):
        assert t.read(keys[0]) is not None  # in use all along: kept
        t.save(keys[i], page(i))
        t.flush()
        assert t.size_on_disk() <= 10 * file_size
    assert t.stats.pages_evicted >= 25
    assert t.read(keys[0]) is not None and t.read(keys[1]) is None


def _hammer(root: str, seed: int, keys: list[str], out) -> None:
    t = tier(Path(root), max_bytes=12 * (NBYTES + 400))
    rng = random.Random(seed)
    wrong = 0
    for _ in range(300):
        i = rng.randrange(len(keys))
        data = t.read(keys[i])
        if data is None:
            t.save(keys[i], page(i))
        elif not np.array_equal(data, page(i)):
            wrong += 1
    t.flush()
    out.put((wrong, t.stats.pages_read, t.stats.bad_files))


def test_two_processes_sharing_a_folder_only_ever_read_whole_right_pages(tmp_path):
    keys = page_keys(list(range(4 * 30)), 4, 30, "model-a")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), s, keys, out)) for s in (1, 2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [wrong for wrong, _, _ in results] == [0, 0]
    assert all(read > 0 for _, read, _ in results)  # each read pages the other wrote
    assert [bad for _, _, bad in results] == [0, 0]  # never a half-written file


# ---- under the scheduler ----


def batch(seed: int, bs: int) -> list[tuple[str, list[int], int]]:
    """A system prompt, documents under it and questions under each document."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 500) for _ in range(5 * bs + 3)]
    out = []
    for d in range(3):
        doc = [rng.randrange(1, 500) for _ in range(rng.randint(2 * bs, 4 * bs))]
        for q in range(4):
            question = [rng.randrange(1, 500) for _ in range(rng.randint(1, 2 * bs))]
            out.append((f"d{d}q{q}", system + doc + question, rng.randint(1, 6)))
    rng.shuffle(out)
    return out


def run(requests, disk: DiskTier | None, bs: int = 4, num_pages: int = 256):
    pool = PagePool(num_pages, bs)
    config = SchedulerConfig(max_num_batched_tokens=32, watermark=0.0)
    sched = Scheduler(config, pool, disk)
    runner = PageTableRunner(pool)
    reqs = []
    for rid, prompt, max_tokens in requests:
        req = Request(rid, prompt, SamplingParams(max_tokens=max_tokens))
        runner.track(req)
        sched.add(req)
        reqs.append(req)
    while sched.has_unfinished():
        out = sched.schedule()
        result = runner.execute(out)
        for key, data in result.saved_pages:
            disk.save(key, data)
        sched.update(out, result)
    if disk is not None:
        disk.flush()
    outputs = {r.request_id: r.output_token_ids for r in reqs}
    return outputs, sched, sum(r.num_disk_tokens for r in reqs)


@pytest.mark.parametrize("seed", range(4))
def test_a_second_run_reads_the_shared_prefixes_from_disk_with_the_same_outputs(tmp_path, seed):
    bs = 4
    requests = batch(seed, bs)
    expected, cold, _ = run(requests, None)
    first, sched1, from_disk = run(requests, tier(tmp_path, 1 << 30, "m", 4 * 8))
    assert first == expected and from_disk == 0
    second, sched2, from_disk = run(requests, tier(tmp_path, 1 << 30, "m", 4 * 8))
    assert second == expected
    # Every prefix shared by two requests was saved by the first run: the second computes
    # only what no other request shares (each request's own tail).
    assert from_disk > 0
    assert sched2.num_prompt_computed_tokens + from_disk == sched1.num_prompt_computed_tokens
    prompts = [p for _, p, _ in requests]
    assert sched1.num_prompt_computed_tokens == ideal_prompt_tokens(prompts, bs)


def test_a_page_that_fails_its_checks_is_computed_instead(tmp_path):
    requests = batch(0, 4)
    expected, _, _ = run(requests, tier(tmp_path, 1 << 30, "m", 4 * 8))
    files = sorted(tmp_path.rglob("*.safetensors"))
    for path in files[::3]:  # a third of the pages, in the middle of chains too
        path.write_bytes(path.read_bytes()[:-7])
    disk = tier(tmp_path, 1 << 30, "m", 4 * 8)
    again, _, from_disk = run(requests, disk)
    assert again == expected
    assert disk.stats.bad_files > 0 and from_disk > 0
    # The bad ones it met were computed and saved anew: a third run reads more from disk.
    third, _, third_from_disk = run(requests, tier(tmp_path, 1 << 30, "m", 4 * 8))
    assert third == expected and third_from_disk > from_disk
