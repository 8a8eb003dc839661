"""Every supported family, exact to transformers: greedy float32 tokens equal its forward
with prefix sharing on and off, the shared-prefix kernels on and off, n-gram speculation
and forced preemption; prompt logprobs within 1e-4; the same weights as GGUF give the same
tokens; a config without a field the family needs is refused by name.

Three engines per family cover every switch: each switch is on in one and off in another.
"""

from __future__ import annotations

import pytest
import torch

from prefixflow import LLM, SamplingParams
from tests.family_models import FAMILIES, build_family_model, family_prompts, greedy_reference

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
ECHO_TOKENS = 40
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "auto": False}
# Shared parts even for this short prefix (the defaults wait for longer ones).
SHARE = dict(shared_prefix_min_tokens=16, shared_prefix_min_part_tokens=16)
RUNS = {
    "sharing, kernels and n-gram speculation": dict(speculative_config=NGRAM, **SHARE),
    "sharing without kernels": dict(attention_kernels=False, **SHARE),
    "no sharing, plain paged attention, forced preemption": dict(
        enable_prefix_caching=False,
        attention_backend="paged",
        kv_cache_memory="150KiB",
        admission="aggressive",
        max_num_batched_tokens=64,
    ),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp(request.param)
    ref = build_family_model(request.param, folder, tokenizer)
    prompts = family_prompts()
    want = greedy_reference(ref, prompts, MAX_TOKENS)
    # For n-gram speculation, a ninth prompt made of the model's own outputs and of the
    # tokens with the largest output rows (where a random model's argmax tends to land),
    # and a longer continuation: it repeats some, so every family has drafts to verify.
    rows = ref.get_output_embeddings().weight.norm(dim=-1)
    echo = [t for w in want for t in w] + rows.topk(300).indices.tolist()
    echo_want = greedy_reference(ref, [echo], ECHO_TOKENS)[0]
    return request.param, folder, ref, prompts, want, (echo, echo_want)


def _generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens],
        use_tqdm=False,
    )
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_tokens_equal_transformers_in_every_mode(family):
    name, folder, ref, prompts, want, (echo, echo_want) = family
    for run, options in RUNS.items():
        llm = LLM(model=str(folder), dtype="float32", **{"kv_cache_memory": "16MiB", **options})
        spec = "speculation" in run
        batch = prompts + [echo] if spec else prompts
        lengths = [MAX_TOKENS] * len(prompts) + [ECHO_TOKENS] * spec
        got = _generate(llm, batch, lengths)
        for i, (g, w) in enumerate(zip(got, want + [echo_want] * spec, strict=True)):
            assert g == w, f"{name}, {run}: prompt {i} gave {g}, transformers {w}"
        stats = llm.engine.stats
        if "preemption" in run:
            assert stats.preemptions > 0
        else:  # the three prompts with one prefix shared its pages
            assert stats.cached_prompt_tokens >= 2 * 32
        if spec:
            assert stats.draft_tokens > 0
            # prompt logprobs, some read from the prefix cache this run filled
            _check_prompt_logprobs(llm, ref, prompts[:4], name)


def _check_prompt_logprobs(llm: LLM, ref, prompts: list[list[int]], name: str) -> None:
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(max_tokens=1, prompt_logprobs=1),
        use_tqdm=False,
    )
    for p, out in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            want = torch.log_softmax(ref(torch.tensor([p])).logits[0].float(), -1)
        got = [out.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        exp = [want[i - 1, p[i]].item() for i in range(1, len(p))]
        assert got == pytest.approx(exp, abs=1e-4), name


def test_the_same_weights_as_gguf_give_the_same_tokens(family, tmp_path, tokenizer):
    from tests.gguf_export import write_gguf

    name, _, _, prompts, *_ = family
    prompts = prompts[2:6]  # one with the shared prefix, and lengths from 5 to 70
    folder = tmp_path / "folder"
    build_family_model(name, folder, tokenizer, gguf_expressible=True)
    gguf = write_gguf(folder, tmp_path / f"{name}.gguf")
    lengths = [MAX_TOKENS] * len(prompts)
    outs = []
    for path in (folder, gguf):
        outs.append(
            _generate(
                LLM(model=str(path), dtype="float32", kv_cache_memory="16MiB"), prompts, lengths
            )
        )
    assert outs[0] == outs[1]


def test_a_config_without_a_field_its_family_needs_is_refused_naming_it(family, tmp_path):
    import json
    import shutil

    from prefixflow.model.arch import ConfigFieldError

    name, folder, *_ = family
    needs = {
        "qwen3": "head_dim",
        "qwen3_moe": "num_experts",
        "mixtral": "num_local_experts",
        "olmoe": "num_experts_per_tok",
        "gemma2": "query_pre_attn_scalar",
        "gemma3": "query_pre_attn_scalar",
    }
    if name not in needs:
        pytest.skip(f"{name} reads no field beyond the common ones")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg[needs[name]] = None
    (broken / "config.json").write_text(json.dumps(cfg))
    # transformers' own config classes refuse some nulls first; either way, by name
    with pytest.raises((ConfigFieldError, ValueError), match=needs[name]):
        LLM(model=str(broken), dtype="float32", kv_cache_memory="16MiB")
