"""ParamsCache: one value per live SamplingParams object, nothing stored on it."""

from __future__ import annotations

import gc
import pickle

from prefixflow.sample.params_cache import ParamsCache
from prefixflow.sampling_params import SamplingParams


def test_built_once_per_params_object():
    built = []
    cache = ParamsCache(lambda p: built.append(p) or len(built))
    a, b = SamplingParams(logit_bias={1: 2.0}), SamplingParams(logit_bias={1: 2.0})
    assert cache(a) == 1 and cache(a) == 1
    assert cache(b) == 2  # equal params, another request: its own value
    assert built == [a, b]


def test_nothing_is_stored_on_the_params():
    a = SamplingParams(logit_bias={3: 1.0})
    before = dict(vars(a))
    ParamsCache(lambda p: object())(a)
    assert vars(a) == before
    assert pickle.loads(pickle.dumps(a)) == a


def test_an_entry_goes_with_its_params_and_a_reused_id_misses():
    cache = ParamsCache(lambda p: dict(p.logit_bias))
    a = SamplingParams(logit_bias={1: 1.0})
    assert cache(a) == {1: 1.0} and len(cache) == 1
    del a
    gc.collect()
    assert len(cache) == 0
    # Objects made and dropped in turn often get the same id: each sees its own value.
    for i in range(20):
        p = SamplingParams(logit_bias={i: 1.0})
        assert cache(p) == {i: 1.0}
        del p
    gc.collect()
    assert len(cache) == 0
