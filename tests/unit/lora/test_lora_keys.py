"""LoRA adapters on the torch-free side: each adapter's prefixes are its own in the radix
cache, the scheduler and the disk keys; an adapter's update drops only its own cached KV
and applies the in-flight policy to its own requests; the registry's names and limits."""

from __future__ import annotations

import pytest

from prefixflow import errors
from prefixflow.cache.disk_tier import page_keys
from prefixflow.cache.page_pool import PagePool
from prefixflow.cache.radix_cache import RadixCache
from prefixflow.config import EngineConfig, parse_lora_modules
from prefixflow.engine.in_flight import lora_after_update
from prefixflow.errors import RequestError
from prefixflow.lora.registry import Adapter, LoRARegistry, cache_salt
from prefixflow.request import FinishReason, Request
from prefixflow.sampling_params import SamplingParams
from tests.page_table_runner import PageTableRunner
from tests.unit.engine.test_scheduler import make_scheduler
from tests.unit.engine.test_weight_versions import PROMPT, run_steps


def test_radix_cache_keeps_each_salt_apart_and_forgets_one():
    pool = PagePool(16, 4)
    cache = RadixCache(pool)
    tokens = list(range(12))
    for salt in ("", "lora:a", "lora:b"):
        pages = pool.allocate(3)
        cache.insert(tokens, pages, 0, 3, salt=salt)
        pool.release(pages[::-1])
    hits = {salt: cache.match(tokens, 3, salt=salt) for salt in ("", "lora:a", "lora:b")}
    assert all(len(h) == 3 for h in hits.values())
    assert len({tuple(h) for h in hits.values()}) == 3  # three copies, one per salt
    assert cache.match(tokens, 3, salt="lora:c") == []
    for h in hits.values():
        pool.release(h[::-1])
    assert cache.forget_salt("lora:a") == 3
    assert cache.match(tokens, 3, salt="lora:a") == []
    b = cache.match(tokens, 3, salt="lora:b")
    assert b == hits["lora:b"]  # the other adapter's prefix stays


def test_disk_keys_of_an_adapter_differ_from_the_base_and_keep_the_base_names():
    ids = list(range(32))
    assert page_keys(ids, 16, 2, "fp") != page_keys(ids, 16, 2, "fp;lora:a")


def add(sched, runner, rid: str, key: str | None, name: str | None = None, **params) -> Request:
    params = SamplingParams(ignore_eos=True, lora_name=name or key, **params)
    req = Request(rid, list(PROMPT), params, lora_key=key)
    runner.track(req)
    sched.add(req)
    return req


def test_requests_share_prefixes_only_under_the_same_adapter():
    sched, pool = make_scheduler(num_pages=64, page_size=4)
    runner = PageTableRunner(pool)
    add(sched, runner, "a1", "A", max_tokens=2)
    run_steps(sched, pool, runner)
    reqs = [
        add(sched, runner, "b", "B", max_tokens=2),
        add(sched, runner, "base", None, max_tokens=2),
        add(sched, runner, "a2", "A", max_tokens=2),
    ]
    run_steps(sched, pool, runner)
    assert [r.num_cached_tokens for r in reqs] == [0, 0, 20]  # 5 full pages under A only


@pytest.mark.parametrize("in_flight", ["recompute", "abort", "keep"])
def test_an_adapter_update_drops_its_kv_and_moves_its_requests(in_flight):
    sched, pool = make_scheduler(num_pages=96, page_size=4)
    runner = PageTableRunner(pool)
    started = add(sched, runner, "started", "A", max_tokens=10)
    other = add(sched, runner, "other", "B", max_tokens=10)
    run_steps(sched, pool, runner, steps=4)
    queued = add(sched, runner, "queued", "A", max_tokens=4)
    sched.kv.forget_salt(cache_salt("A"))
    aborted = lora_after_update(sched, "A", "A", "A2", in_flight)
    assert queued.lora_key == "A2" and other.lora_key == "B"
    if in_flight == "abort":
        assert aborted == [started] and started.finish_reason == FinishReason.ABORT
    else:
        assert aborted == []
        assert started.lora_key == ("A" if in_flight == "keep" else "A2")
    run_steps(sched, pool, runner)
    assert queued.num_cached_tokens == 0 or in_flight == "recompute"
    later_b = add(sched, runner, "later-b", "B", max_tokens=2)
    later_a = add(sched, runner, "later-a", "A", max_tokens=2)
    run_steps(sched, pool, runner)
    assert later_b.num_cached_tokens == 20  # B's prefix survived A's update
    assert later_a.num_cached_tokens == 0  # A's old KV is gone
    assert pool.num_free == pool.num_pages


def test_another_name_of_the_same_tensors_keeps_them_through_an_update():
    sched, pool = make_scheduler(num_pages=96, page_size=4)
    runner = PageTableRunner(pool)
    started = add(sched, runner, "started", "A", max_tokens=10)
    alias_started = add(sched, runner, "alias-started", "A", name="also-A", max_tokens=10)
    run_steps(sched, pool, runner, steps=2)
    alias_queued = add(sched, runner, "alias-queued", "A", name="also-A", max_tokens=4)
    assert lora_after_update(sched, "A", "A", "A2", "recompute") == []
    assert started.lora_key == "A2"
    assert alias_started.lora_key == "A" and alias_queued.lora_key == "A"
    run_steps(sched, pool, runner)
    assert pool.num_free == pool.num_pages


def adapter(name: str, key: str, static: bool = False) -> Adapter:
    return Adapter(name, 1, f"/x/{name}", key, 8, ("q_proj",), static)


def test_registry_replaces_the_least_recently_used_idle_adapter():
    reg = LoRARegistry(max_loras=2, max_lora_rank=16)
    reg.add(adapter("a", "ka"))
    reg.add(adapter("b", "kb"))
    reg.get("a")  # a used last: b goes first
    victim = reg.make_room(lambda key: False)
    assert victim.name == "b" and "b" not in reg and "a" in reg
    reg.add(adapter("c", "kc"))
    victim = reg.make_room(lambda key: key == "ka")  # a busy: c goes
    assert victim.name == "c"
    reg.add(adapter("d", "kd", static=True))
    with pytest.raises(RequestError) as e:  # a busy, d loaded for good
        reg.make_room(lambda key: key == "ka")
    assert "max_loras=2" in str(e.value) and e.value.code == errors.INVALID_LORA


def test_registry_errors_name_the_fix():
    reg = LoRARegistry(max_loras=2, max_lora_rank=16)
    with pytest.raises(RequestError) as e:
        reg.get("nope")
    assert e.value.code == errors.MODEL_NOT_FOUND and "load_lora_adapter" in str(e.value)
    with pytest.raises(RequestError) as e:
        reg.check_rank("big", 32)
    assert "max_lora_rank=32" in str(e.value) and e.value.code == errors.INVALID_LORA
    reg.check_rank("ok", 16)


def test_lora_modules_take_vllm_forms_and_turn_lora_on():
    want = (("a", "/p/a"), ("b", "/p/b"))
    assert parse_lora_modules(["a=/p/a", "b=/p/b"]) == want
    assert parse_lora_modules("a=/p/a, b=/p/b") == want
    assert parse_lora_modules({"a": "/p/a", "b": "/p/b"}) == want
    assert parse_lora_modules(['{"name": "a", "path": "/p/a"}']) == (("a", "/p/a"),)
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["a"])
    with pytest.raises(ValueError, match="twice"):
        parse_lora_modules(["a=/x", "a=/y"])
    assert EngineConfig.from_options(lora_modules=["a=/p/a"]).enable_lora
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig.from_options(max_lora_rank=0)


def test_the_router_sends_an_adapters_prefix_where_that_adapters_kv_is():
    from prefixflow.ray.router import PrefixRouter

    router = PrefixRouter(2, 4)
    prompt = list(range(40))
    first = router.route(prompt, "lora-name:a")
    assert router.route(prompt, "lora-name:b") != first  # no match: the idle replica
    assert router.route(prompt, "lora-name:a") == first  # its prefix's owner
