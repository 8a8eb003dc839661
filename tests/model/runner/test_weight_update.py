"""LLM.update_weights on the default model, float32: in place, equal to a fresh load of
the same weights, no KV of older weights served, and the three ways of handling requests
in flight (recompute, abort, keep)."""

from __future__ import annotations

import pytest
import torch

from prefixflow import LLM, SamplingParams
from prefixflow.model.default import default_model_path
from tests.model_folders import default_weights, export_default_model, perturbed_weights
from tests.prompts import PARAGRAPHS

pytestmark = pytest.mark.slow

# Long enough to fill KV pages, so the prefix cache holds them.
PROMPTS = [
    f"{PARAGRAPHS[i][:240]}\n{q}"
    for i, q in enumerate(["Summarise this.", "What is it about?", "Continue the text."])
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def new_folder(tmp_path_factory):
    return export_default_model(
        tmp_path_factory.mktemp("perturbed"), weights=lambda: perturbed_weights(seed=3)
    )


@pytest.fixture(scope="module")
def changed():
    """The tensors the perturbed model changes, and the same ones as they were."""
    new = dict(perturbed_weights(seed=3, only_changed=True))
    old = {k: v for k, v in default_weights() if k in new}
    return new, old


@pytest.fixture(scope="module")
def new_llm(new_folder):
    """A fresh engine loaded from the perturbed weights: the reference."""
    return LLM(str(new_folder), dtype="float32", kv_cache_memory="128MiB")


@pytest.fixture(scope="module")
def llm():
    """The engine whose weights the tests update (each test sets the weights it needs)."""
    return LLM(dtype="float32", kv_cache_memory="128MiB")


def test_update_equals_a_fresh_load_and_serves_no_old_kv(llm, new_llm, llm_f32, changed):
    old = tokens(llm_f32.generate(PROMPTS, GREEDY, use_tqdm=False))
    llm.update_weights(default_model_path())  # whatever an earlier test left
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == old
    again = llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0  # the prompt is cached under these weights
    version = llm.weight_version
    llm.update_weights(changed[0].items())  # (Hugging Face name, tensor) pairs, some
    assert llm.weight_version == version + 1
    after = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert after[0].num_cached_tokens == 0  # cached before the update: not served
    want = tokens(new_llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert tokens(after) == want != old
    assert set(after[0].outputs[0].weight_versions) == {version + 1}


def test_a_bad_update_leaves_the_old_weights(llm, new_folder, changed):
    llm.update_weights(new_folder)  # a model folder: every tensor
    before = tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    version = llm.weight_version
    good = changed[1]  # the original weights: would change the outputs back
    wrong_shape = [*good.items(), ("model.layers.3.mlp.up_proj.weight", torch.zeros(3, 3))]
    with pytest.raises(ValueError, match=r"up_proj.*shape \(3, 3\).*expects \(1536, 576\)"):
        llm.update_weights(wrong_shape)
    with pytest.raises(ValueError, match="no place in the model"):
        llm.update_weights([*good.items(), ("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
    assert llm.weight_version == version
    assert tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == before


def _start(llm, rid: str, prompt: str, min_tokens_out: int) -> int:
    """Add a greedy request and step until it has generated at least min_tokens_out."""
    eng = llm.engine
    eng.add_request(rid, prompt, GREEDY)
    while len(eng.snapshot(rid).outputs[0].token_ids) < min_tokens_out:
        assert not eng.step()
    return len(eng.snapshot(rid).outputs[0].token_ids)


def _finish(llm) -> dict:
    done = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            done[out.request_id] = out
    return done


def test_recompute_continues_under_the_new_weights(llm, new_llm, llm_f32, changed):
    llm.update_weights(changed[1].items())
    v = llm.weight_version
    m = _start(llm, "r", PROMPTS[0], 8)
    llm.update_weights(changed[0].items())  # in_flight="recompute"
    out = _finish(llm)["r"].outputs[0]
    old = llm_f32.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0]
    assert out.token_ids[:m] == old.outputs[0].token_ids[:m]
    # After the update: the new model's continuation of the prompt and those tokens.
    rest = SamplingParams(temperature=0, max_tokens=GREEDY.max_tokens - m, ignore_eos=True)
    cont = new_llm.generate([old.prompt_token_ids + out.token_ids[:m]], rest, use_tqdm=False)
    assert out.token_ids[m:] == cont[0].outputs[0].token_ids
    assert out.weight_versions == [v] * m + [v + 1] * (len(out.token_ids) - m)


def test_abort_finishes_requests_in_flight_with_their_tokens(llm, llm_f32, changed):
    llm.update_weights(changed[1].items())
    m = _start(llm, "a", PROMPTS[1], 5)
    returned = llm.engine.update_weights(changed[0].items(), in_flight="abort")
    assert [o.request_id for o in returned] == ["a"]
    assert not llm.engine.has_unfinished() and _finish(llm) == {}  # returned once, here
    out = returned[0].outputs[0]
    assert out.finish_reason == "abort" and len(out.token_ids) == m
    old = llm_f32.generate(PROMPTS[1:2], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == old.token_ids[:m]


def test_keep_finishes_under_the_old_weights_beside_new_requests(llm, new_llm, llm_f32, changed):
    llm.update_weights(changed[1].items())
    _start(llm, "old", PROMPTS[2], 4)
    llm.engine.update_weights(changed[0].items(), in_flight="keep")
    assert len(llm.engine.runner.models) == 2
    llm.engine.add_request("new", PROMPTS[2], GREEDY)  # the same prompt, in the same steps
    done = _finish(llm)
    want_old = llm_f32.generate(PROMPTS[2:], GREEDY, use_tqdm=False)[0].outputs[0]
    want_new = new_llm.generate(PROMPTS[2:], GREEDY, use_tqdm=False)[0].outputs[0]
    assert done["old"].outputs[0].token_ids == want_old.token_ids
    assert done["new"].outputs[0].token_ids == want_new.token_ids != want_old.token_ids
    assert done["new"].num_cached_tokens == 0  # the old request's pages are not shared
    assert len(llm.engine.runner.models) == 1  # the old weights went with their last request


def test_a_checkpoint_of_another_config_is_refused(llm, new_folder, tmp_path):
    import json
    import shutil

    other = shutil.copytree(new_folder, tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 0.5
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rms_norm_eps"):
        llm.update_weights(other)
