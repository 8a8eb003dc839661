"""PrefixflowLM through lm-eval's simple_evaluate: the same metrics, loglikelihoods (within
1e-4), greedy flags and generations as lm-eval's own `hf` model on the same float32
weights, with the full context and with a max_length that cuts prompts and splits texts."""

from __future__ import annotations

import pytest

from tests.e2e.eval.conftest import SHORT, assert_same_results, evaluate, samples_by_doc

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'prefixflow[eval]'")


def test_equals_the_hf_backend(pf_lm, task_manager, hf_results, monkeypatch):
    """...with each request type's requests sent to the engine in one call, so that the
    requests sharing a few-shot header and a question run together: the prompt tokens the
    engine computes are within the issue's bound of the token trie's size (1.02x, plus a
    page per request), prompt logprobs on."""
    calls = []  # (prompts, prompt tokens computed)
    generate, stats = pf_lm.llm.generate, lambda: pf_lm.llm.engine.stats
    page = pf_lm.llm.config.page_size

    def counted(prompts, *args, **kwargs):
        before = stats().prompt_computed_tokens
        outs = generate(prompts, *args, **kwargs)
        calls.append((prompts, stats().prompt_computed_tokens - before))
        return outs

    monkeypatch.setattr(pf_lm.llm, "generate", counted)
    assert_same_results(evaluate(pf_lm, task_manager), hf_results)
    # loglikelihood (10 questions x 4 choices), generate_until (8), rolling (3 one-window texts)
    assert sorted(len(p) for p, _ in calls) == [3, 8, 40]
    prompts, computed = next(c for c in calls if len(c[0]) == 40)
    trie = len({tuple(p[:i]) for p in prompts for i in range(1, len(p) + 1)})
    assert computed <= 1.02 * trie + page * len(prompts) < sum(map(len, prompts))


def test_equals_the_hf_backend_when_max_length_cuts(pf_lm, task_manager, hf_results_short):
    from prefixflow.integrations.lm_eval import PrefixflowLM

    short = PrefixflowLM(llm=pf_lm.llm, max_length=SHORT)  # the same engine
    assert_same_results(evaluate(short, task_manager), hf_results_short)


def test_registered_as_prefixflow_with_model_args(tiny_model, task_manager, hf_results):
    """model="prefixflow" and an lm-eval model_args string (engine options among them)."""
    import prefixflow.integrations.lm_eval  # noqa: F401  registers "prefixflow"

    res = evaluate(
        "prefixflow",
        task_manager,
        tasks=["pf_capitals"],
        model_args=f"pretrained={tiny_model},dtype=float32,kv_cache_memory=64MiB,batch_size=8",
        limit=2,
    )
    want = samples_by_doc(hf_results, "pf_capitals")[:2]
    for g, w in zip(samples_by_doc(res, "pf_capitals"), want, strict=True):
        for (gl, gg), (wl, wg) in zip(g["filtered_resps"], w["filtered_resps"], strict=True):
            assert abs(gl - wl) <= 1e-4 and gg == wg


def test_is_greedy_means_every_continuation_token_ranks_first(pf_lm):
    """The greedy continuation of a context is greedy; one token changed, it is not. The
    score is the sum of the token logprobs the engine gives for the same prompt."""
    from lm_eval.api.instance import Instance

    from prefixflow import SamplingParams

    context = "Question: What is the capital of France?\nAnswer:"
    ids = pf_lm.tok_encode(context)
    out = pf_lm.llm.generate([ids], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    greedy = out[0].outputs[0].token_ids
    other = greedy[:2] + [(greedy[2] + 1) % 49152]
    texts = [pf_lm.tokenizer.decode(t) for t in (greedy, other)]
    assert [pf_lm.tok_encode(context + t)[len(ids) :] for t in texts] == [greedy, other]

    def instance(cont: str) -> Instance:
        return Instance("loglikelihood", {}, (context, cont), 0)

    requests = [instance(texts[0]), instance(texts[1]), instance(texts[0])]  # one twice
    (lp_greedy, is_greedy), (lp_other, is_other), again = pf_lm.loglikelihood(requests)
    assert is_greedy and not is_other and again == (lp_greedy, is_greedy)
    full = pf_lm.llm.generate(
        [ids + greedy], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
    )[0]
    want = sum(e[t].logprob for t, e in zip(greedy, full.prompt_logprobs[len(ids) :], strict=True))
    assert lp_greedy == pytest.approx(want, abs=1e-5)


def test_an_empty_context_is_the_prefix_token(pf_lm):
    """lm-eval scores a continuation with no context after BOS (HFLM's rule), and a
    rolling text from BOS too: the two agree for a text that fits one window."""
    from lm_eval.api.instance import Instance

    text = "A good loaf needs flour, water, salt and time."
    ((lp, _),) = pf_lm.loglikelihood([Instance("loglikelihood", {}, ("", text), 0)])
    (rolling,) = pf_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert pf_lm.prefix_token_id == pf_lm.tokenizer.bos_token_id == 1
    assert lp == pytest.approx(rolling, abs=1e-5)


@pytest.mark.parametrize("add_bos_token", [None, True, False])
def test_add_bos_token_encodes_as_the_hf_backend(pf_lm, hf_lm, tiny_model, add_bos_token):
    from lm_eval.models.huggingface import HFLM

    from prefixflow.integrations.lm_eval import PrefixflowLM

    ours = PrefixflowLM(llm=pf_lm.llm, add_bos_token=add_bos_token)
    hf = HFLM(pretrained=hf_lm.model, tokenizer=str(tiny_model), add_bos_token=add_bos_token)
    for text in ["Question: What is 2 plus 3?", "<|im_start|>user\nHi<|im_end|>\n", " a"]:
        assert ours.tok_encode(text) == hf.tok_encode(text), text
    assert (ours.tok_encode("x")[0] == 1) == bool(add_bos_token)
    assert pf_lm.tok_encode("x")[0] != 1  # the engine's own tokenizer is left as it was


def test_generation_settings_become_sampling_params(pf_lm, monkeypatch):
    """Greedy unless do_sample; a sampled task's temperature, top_p and seed pass through;
    until and the EOS text become stop strings; max_gen_toks, else the model's."""
    from lm_eval.api.instance import Instance

    from prefixflow.integrations.lm_eval import PrefixflowLM

    lm = PrefixflowLM(llm=pf_lm.llm, max_gen_toks=5)
    sent = []
    generate = lm.llm.generate
    monkeypatch.setattr(
        lm.llm, "generate", lambda p, params, **kw: sent.extend(params) or generate(p, params, **kw)
    )
    settings = [
        {"until": ["\n"], "temperature": 0.7, "do_sample": False},
        {
            "until": "Q:",
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "max_gen_toks": 3,
        },
    ]
    texts = lm.generate_until(
        [Instance("generate_until", {}, ("Q: 1+1?\nA:", s), 0) for s in settings]
    )
    greedy, sampled = sent
    assert (
        greedy.temperature == 0 and greedy.max_tokens == 5 and greedy.stop == ["\n", "<|im_end|>"]
    )
    assert (sampled.temperature, sampled.top_p, sampled.seed) == (0.7, 0.9, 3)
    assert sampled.max_tokens == 3 and sampled.stop == ["Q:", "<|im_end|>"]
    assert "\n" not in texts[0] and "Q:" not in texts[1]
