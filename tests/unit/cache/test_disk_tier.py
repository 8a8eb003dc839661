"""The KV disk tier on its own (files, checks, the size bound, failing writes, processes
sharing a folder) and under the scheduler with the page-table runner, whose pages hold
token ids: a page read from disk that is not the prefix it claims to be shows up as a
wrong context."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from prefixflow.cache import disk_tier as disk_tier_module
from prefixflow.cache import page_file
from prefixflow.cache.disk_tier import DiskTier, page_keys
from prefixflow.cache.page_file import BadPage, decode, encode
from prefixflow.cache.page_pool import PagePool
from prefixflow.config import SchedulerConfig
from prefixflow.engine.scheduler import Scheduler
from tests.page_table_runner import PageTableRunner, ideal_prompt_tokens, queue_request

NBYTES = 4096
FILE = NBYTES + 400  # a page file: the page and the safetensors header
A, B = "a" * 32, "b" * 32  # fingerprints of two models


def tier(root: Path, max_bytes: int = 1 << 30, fingerprint: str = A, nbytes: int = NBYTES):
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
    assert tier(tmp_path, fingerprint=B).count_present(keys) == 0


def _bf16_file(key: str) -> bytes:
    """A well-formed safetensors file whose tensor is bfloat16, not bytes."""
    meta = {"format": page_file.FORMAT, "fingerprint": A, "key": key, "nbytes": str(NBYTES)}
    header = {"kv": {"dtype": "BF16", "shape": [NBYTES // 2], "data_offsets": [0, NBYTES]}}
    head = json.dumps({**header, "__metadata__": meta}).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + page(0).tobytes()


def test_each_check_refuses_a_file_that_is_right_in_everything_else(tmp_path):
    key, other = page_keys(list(range(8)), 4, 2, A)
    good = encode(A, key, page(0))
    flipped = bytearray(good)
    flipped[-10] ^= 1
    cases = {
        "torn": (good[: len(good) // 2], "unreadable"),
        "a bit flipped": (bytes(flipped), "checksum"),
        "garbage": (b"not a safetensors file", "unreadable"),
        "another model's": (encode(B, key, page(0)), "another model"),
        "another prefix's": (encode(A, other, page(0)), "another prefix"),
        "the wrong size": (encode(A, key, page(0)[:100]), "bytes"),
        "bfloat16": (_bf16_file(key), "unreadable"),
    }
    path = tmp_path / "page.safetensors"
    for blob, reason in cases.values():
        path.write_bytes(blob)
        with pytest.raises(BadPage, match=reason):
            decode(path, A, key, NBYTES)
    path.write_bytes(good)
    assert np.array_equal(decode(path, A, key, NBYTES)[0], page(0))

    t = tier(tmp_path / "tier")
    for what, (blob, _) in cases.items():
        target = t._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
        assert t.read(key) is None, what
        assert not target.exists(), what  # deleted: the next write replaces it
    assert t.stats.bad_files == len(cases)


def test_a_file_that_cannot_be_opened_is_a_miss_and_stays(tmp_path):
    t = tier(tmp_path)
    (key,) = page_keys(list(range(4)), 4, 1, A)
    t._path(key).mkdir(parents=True)  # opening it fails as a flaky disk would
    assert t.read(key) is None
    assert t._path(key).exists() and t.stats.bad_files == 0


def test_the_folder_stays_under_its_bound_dropping_least_recently_used(tmp_path):
    foreign = [tmp_path / "model.safetensors", tmp_path / "notes.tmp", tmp_path / A / "README"]
    for f in foreign:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x" * 20 * FILE)
        os.utime(f, (0, 0))  # older than anything: first to go, were they the tier's
    t = tier(tmp_path, max_bytes=10 * FILE)
    keys = page_keys(list(range(4 * 40)), 4, 40, t.fingerprint)
    for i in range(3):
        t.save(keys[i], page(i))
    t.flush()
    for i in range(3, 40):
        assert t.read(keys[0]) is not None  # in use all along: kept
        t.save(keys[i], page(i))
        t.flush()
        assert t.size_on_disk() <= 10 * FILE
    assert t.stats.pages_evicted >= 25
    assert t.read(keys[0]) is not None and t.read(keys[1]) is None
    assert all(f.exists() for f in foreign)  # never the tier's to delete


def test_a_page_read_from_ram_keeps_its_file_recently_used(tmp_path):
    t = tier(tmp_path)
    (key,) = page_keys(list(range(4)), 4, 1, A)
    t.save(key, page(0))
    t.flush()
    os.utime(t._path(key), (0, 0))
    other = tier(tmp_path)
    assert not other.wants(key)  # on disk: nothing to save, but it is in use
    other.flush()
    assert t._path(key).stat().st_mtime > 1e9


def test_a_failing_disk_pauses_saving_and_leaves_no_partial_file(tmp_path, monkeypatch):
    t = tier(tmp_path)
    keys = page_keys(list(range(12)), 4, 3, A)

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_tier_module.os, "replace", full)
    assert t.wants(keys[0])
    t.save(keys[0], page(0))
    t.flush()  # returns: the writer lives on
    assert t.stats.write_errors == 1 and not list(tmp_path.rglob("*.tmp"))
    assert not t.wants(keys[1])  # paused
    monkeypatch.undo()
    monkeypatch.setattr(disk_tier_module.page_file, "encode", lambda *a: 1 / 0)
    t._paused_until = 0
    t.save(keys[1], page(1))
    t.flush()  # any error, not only OSError
    assert t.stats.write_errors == 2 and t._thread.is_alive()


def test_writers_in_one_folder_overshoot_the_bound_by_a_tenth_each_at_most(tmp_path):
    tiers = [tier(tmp_path, max_bytes=40 * FILE) for _ in range(3)]
    keys = page_keys(list(range(4 * 150)), 4, 150, A)
    for i, key in enumerate(keys):
        tiers[i % 3].save(key, page(i))
    for t in tiers:
        t.flush()
    assert tiers[0].size_on_disk() <= 40 * FILE * 1.3


def _hammer(root: str, me: int, keys: list[str], barrier, out) -> None:
    """Write my half of the pages, then read all of them in a random order while the other
    process does the same, writing back any of mine that went missing."""
    t = tier(Path(root))
    mine = [i for i in range(len(keys)) if i % 2 == me]
    for i in mine:
        t.save(keys[i], page(i))
    t.flush()
    barrier.wait(timeout=60)
    rng = random.Random(me)
    wrong = theirs = 0
    for _ in range(200):
        i = rng.randrange(len(keys))
        data = t.read(keys[i])
        if data is None:
            t.save(keys[i], page(i))
        elif not np.array_equal(data, page(i)):
            wrong += 1
        else:
            theirs += i % 2 != me
    t.flush()
    out.put((wrong, theirs, t.stats.bad_files))


def test_two_processes_sharing_a_folder_read_each_others_pages_whole(tmp_path):
    keys = page_keys(list(range(4 * 30)), 4, 30, A)
    ctx = multiprocessing.get_context("fork")
    out, barrier = ctx.Queue(), ctx.Barrier(2)
    procs = [
        ctx.Process(target=_hammer, args=(str(tmp_path), me, keys, barrier, out)) for me in (0, 1)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [wrong for wrong, _, _ in results] == [0, 0]
    assert all(theirs > 0 for _, theirs, _ in results)  # pages the other process wrote
    assert [bad for _, _, bad in results] == [0, 0]  # never a half-written file


# ---- under the scheduler ----


def batch(seed: int, page_size: int) -> list[tuple[str, list[int], int, int]]:
    """A system prompt, documents under it and questions under each document."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 500) for _ in range(5 * page_size + 3)]
    out = []
    for d in range(3):
        doc = [rng.randrange(1, 500) for _ in range(rng.randint(2 * page_size, 4 * page_size))]
        for q in range(4):
            question = [rng.randrange(1, 500) for _ in range(rng.randint(1, 2 * page_size))]
            out.append((f"d{d}q{q}", system + doc + question, rng.randint(1, 6), 1 + 2 * (q == 0)))
    rng.shuffle(out)
    return out


def run(
    requests,
    disk: DiskTier | None,
    page_size: int = 4,
    num_pages: int = 256,
    admission="past_future",
):
    pool = PagePool(num_pages, page_size)
    config = SchedulerConfig(max_num_batched_tokens=32, watermark=0.0, admission=admission)
    sched = Scheduler(config, pool, disk)
    runner = PageTableRunner(pool)
    reqs, leaders = [], []
    for rid, prompt, max_tokens, n in requests:
        samples = queue_request(sched, runner, rid, prompt, max_tokens, n)
        reqs += samples
        leaders.append(samples[0])  # n samples read the prompt once
    while sched.has_unfinished():
        out = sched.schedule()
        result = runner.execute(out)
        for key, data in result.saved_pages:
            disk.save(key, data)
        sched.update(out, result)
    assert pool.num_free == pool.num_pages  # every page given back, read from disk or not
    if disk is not None:
        disk.flush()
    outputs = {r.request_id: r.output_token_ids for r in reqs}
    return outputs, sched, sum(r.num_disk_tokens for r in leaders)


def nbytes(page_size: int = 4) -> int:
    return page_size * 8  # the page-table runner's page: its token ids as int64


@pytest.mark.parametrize("seed", range(4))
def test_a_second_run_reads_the_shared_prefixes_from_disk_with_the_same_outputs(tmp_path, seed):
    page_size = 4
    requests = batch(seed, page_size)
    expected, _, _ = run(requests, None)
    first, sched1, from_disk = run(requests, tier(tmp_path, nbytes=nbytes()))
    assert first == expected and from_disk == 0
    second, sched2, from_disk = run(requests, tier(tmp_path, nbytes=nbytes()))
    assert second == expected
    # Every prefix shared by two requests was saved by the first run: the second computes
    # only what no other request shares (each request's own tail).
    assert from_disk > 0
    assert sched2.num_prompt_computed_tokens + from_disk == sched1.num_prompt_computed_tokens
    assert sched1.num_prompt_computed_tokens == ideal_prompt_tokens(
        [p for _, p, _, _ in requests], page_size
    )
    # Another model (a weight update changes the fingerprint) reads none of it.
    assert run(requests, tier(tmp_path, fingerprint=B, nbytes=nbytes()))[2] == 0


def test_preemption_reads_from_disk_again_with_the_same_outputs(tmp_path):
    requests = [(rid, prompt, 3 * m, n) for rid, prompt, m, n in batch(1, 4)]
    expected, _, _ = run(requests, None)
    run(requests, tier(tmp_path, nbytes=nbytes()))
    small = {"num_pages": 24, "admission": "aggressive"}
    again, sched, from_disk = run(requests, tier(tmp_path, nbytes=nbytes()), **small)
    assert again == expected and from_disk > 0 and sched.num_preemptions > 0


def test_a_page_that_fails_its_checks_is_computed_instead(tmp_path):
    requests = batch(0, 4)
    expected, _, _ = run(requests, tier(tmp_path, nbytes=nbytes()))
    files = sorted(tmp_path.rglob("*.safetensors"))
    for path in files[::3]:  # a third of the pages, in the middle of chains too
        path.write_bytes(path.read_bytes()[:-7])
    disk = tier(tmp_path, nbytes=nbytes())
    again, _, from_disk = run(requests, disk)
    assert again == expected
    assert disk.stats.bad_files > 0 and from_disk > 0
    # The bad ones it met were computed and saved anew: a third run reads more from disk.
    third, _, third_from_disk = run(requests, tier(tmp_path, nbytes=nbytes()))
    assert third == expected and third_from_disk > from_disk
