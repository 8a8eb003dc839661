"""Multi-LoRA against transformers with peft, in float32, on a tiny random-weight Llama.

Four adapters (ranks 8 and 16, different target modules, rsLoRA and alpha_pattern among
them) and the base model in one mixed batch give each request peft's greedy tokens and
prompt logprobs; the KV of a prompt is reused only under its own adapter; update_lora
swaps one adapter's tensors and drops only its cached KV; bad adapters and unknown names
get a clear error of their own and nothing else is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from prefixflow import LLM, LoRARequest, SamplingParams, errors
from prefixflow.errors import RequestError
from tests.lora_adapters import make_adapter, peft_model
from tests.model_folders import tiny_llama_folder

pytestmark = pytest.mark.slow

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "a1": dict(r=8, target_modules=["q_proj", "v_proj"]),
    "a2": dict(r=16, target_modules=ALL),
    "a3": dict(r=8, lora_alpha=32, use_rslora=True, target_modules=["o_proj", "down_proj"]),
    "a4": dict(
        r=16,
        lora_alpha=8,
        target_modules=["k_proj", "gate_proj", "up_proj"],
        alpha_pattern={"up_proj": 24},
    ),
}
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def lora_dirs(tokenizer, tmp_path_factory) -> dict[str | None, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama_folder(tokenizer, root / "base")
    dirs: dict[str | None, Path] = {None: base}
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        dirs[name] = make_adapter(base, root / name, seed=10 + i, **cfg)
    dirs["rank32"] = make_adapter(base, root / "rank32", seed=20, r=32, target_modules=["q_proj"])
    return dirs


@pytest.fixture(scope="module")
def lora_llm(lora_dirs) -> LLM:
    return LLM(
        str(lora_dirs[None]), dtype="float32", enable_lora=True, max_loras=4, max_lora_rank=16
    )


@pytest.fixture(scope="module")
def references(lora_dirs):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = peft_model(lora_dirs[None], lora_dirs[name] if name else None)
        return cache[name]

    return get


def lora(lora_dirs, name: str | None) -> LoRARequest | None:
    return None if name is None else LoRARequest(name, int(name[1:]), str(lora_dirs[name]))


def check_against_peft(ref, ids: list[int], out) -> float:
    """Assert peft's greedy choices equal ours; the largest prompt logprob difference."""
    ours = out.outputs[0].token_ids
    with torch.inference_mode():
        logits = ref(torch.tensor([ids + ours])).logits[0]
    assert logits[len(ids) - 1 : -1].argmax(-1).tolist() == ours
    worst = 0.0
    if out.prompt_logprobs is not None:
        lp = torch.log_softmax(logits, -1)
        for pos in range(1, len(ids)):
            ours_lp = out.prompt_logprobs[pos][ids[pos]].logprob
            worst = max(worst, abs(ours_lp - lp[pos - 1, ids[pos]].item()))
    return worst


PROMPTS = [list(range(100 + 7 * i, 121 + 13 * i)) for i in range(4)]  # 21 to 60 tokens


@pytest.mark.parametrize("layout", ["even", "ragged"])
def test_a_batch_mixing_four_adapters_and_the_base_equals_peft(
    lora_llm, lora_dirs, references, layout
):
    """even: as many requests under each adapter, the base first (decode rows as views of
    one batched GEMM); ragged: more under some, the base in between (rows gathered)."""
    names = [None, "a1", "a2", "a3", "a4"] if layout == "even" else ["a1", None, "a2", "a3", "a4"]
    items = [(p, n) for p in PROMPTS for n in names]  # adapters interleaved, as a file mixes them
    if layout == "ragged":
        items += [(PROMPTS[1][:9], "a2"), (PROMPTS[2][:5], "a3"), (PROMPTS[0][:7], "a3")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=0)
    outs = lora_llm.generate(
        [{"prompt_token_ids": p} for p, _ in items],
        params,
        lora_request=[lora(lora_dirs, n) for _, n in items],
        use_tqdm=False,
    )
    worst = max(
        check_against_peft(references(n), p, o) for (p, n), o in zip(items, outs, strict=True)
    )
    assert worst < 1e-4
    by_name = {
        n: [o.outputs[0].token_ids for (_, m), o in zip(items, outs, strict=True) if m == n]
        for n in names
    }
    for n in ADAPTERS:
        assert by_name[n] != by_name[None], f"adapter {n} changed nothing"


def test_batched_gemms_on_and_off_give_the_same_outputs(lora_llm, lora_dirs):
    """lora_batched off: every adapter's rows take GEMMs of their own."""
    off = LLM(
        str(lora_dirs[None]), dtype="float32", enable_lora=True, max_loras=4, lora_batched=False
    )
    names = ["a1", None, "a2", "a3", "a4"]
    items = [(p, n) for p in PROMPTS for n in names] + [(PROMPTS[1][:9], "a2")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=0)
    outs = [
        llm.generate(
            [{"prompt_token_ids": p} for p, _ in items],
            params,
            lora_request=[lora(lora_dirs, n) for _, n in items],
            use_tqdm=False,
        )
        for llm in (lora_llm, off)
    ]
    for on_out, off_out in zip(*outs, strict=True):
        assert on_out.outputs[0].token_ids == off_out.outputs[0].token_ids
        for a, b in zip(on_out.prompt_logprobs[1:], off_out.prompt_logprobs[1:], strict=True):
            (x,), (y,) = a.values(), b.values()
            assert abs(x.logprob - y.logprob) < 1e-5


def test_a_prefill_beside_other_adapters_decodes_equals_peft(lora_llm, lora_dirs, references):
    """a3's long prompt arrives while a1, a2 and a4 decode: its prefill chunk runs alone
    between their rows, which take the batched GEMMs around it (scattered back)."""
    eng = lora_llm.engine
    for name in ("a1", "a2", "a3", "a4"):
        eng.add_lora(lora(lora_dirs, name))
    prompts = {}
    for i, name in enumerate(("a1", "a2", "a4")):
        for j in range(2):
            prompts[f"{name}-{j}"] = (PROMPTS[j][: 6 + i], name)
    params = {}
    for rid, (ids, name) in prompts.items():
        params[rid] = GREEDY.clone()
        params[rid].lora_name = name
        eng.add_request(rid, ids, params[rid])
    outs = {}
    for _ in range(3):
        outs.update({o.request_id: o for o in eng.step()})
    prompts["late"] = (list(range(600, 660)), "a3")
    params["late"] = GREEDY.clone()
    params["late"].lora_name = "a3"
    eng.add_request("late", prompts["late"][0], params["late"])
    while eng.has_unfinished():
        outs.update({o.request_id: o for o in eng.step()})
    for rid, (ids, name) in prompts.items():
        check_against_peft(references(name), ids, outs[rid])


def test_kv_is_reused_only_under_the_same_adapter(lora_llm, lora_dirs, references):
    prompt = list(range(300, 396))  # 6 pages of 16

    def run(name):
        (out,) = lora_llm.generate(
            [{"prompt_token_ids": prompt}],
            GREEDY,
            lora_request=lora(lora_dirs, name),
            use_tqdm=False,
        )
        check_against_peft(references(name), prompt, out)
        return out.num_cached_tokens, out.outputs[0].token_ids

    first_a1 = run("a1")
    assert run("a2")[0] == 0  # the same tokens, another adapter: computed
    assert run(None)[0] == 0  # nor the base model's
    again_a1 = run("a1")
    assert again_a1 == (80, first_a1[1])  # 5 of its 6 pages read back (the last computed)
    assert run("a2")[0] == 80


def test_update_lora_swaps_one_adapter_and_drops_only_its_kv(lora_dirs, references, tmp_path):
    llm = LLM(
        str(lora_dirs[None]),
        dtype="float32",
        # twin: a second name of a2's folder, the same tensors
        lora_modules=[f"a2={lora_dirs['a2']}", f"a1={lora_dirs['a1']}", f"twin={lora_dirs['a2']}"],
    )
    prompt = list(range(500, 580))

    def run(name):
        params = GREEDY.clone()
        params.lora_name = name
        (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        return out

    before = run("a2")
    run("a1")
    twin = run("twin")  # the same tensors: a2's KV serves it
    assert twin.num_cached_tokens == 64 and twin.outputs[0].token_ids == before.outputs[0].token_ids
    new = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
        for k, v in load_file(str(lora_dirs["a2"] / "adapter_model.safetensors")).items()
    }
    llm.update_lora("a2", new)
    after = run("a2")
    assert (
        after.num_cached_tokens == 0 and after.outputs[0].token_ids != before.outputs[0].token_ids
    )
    # peft on the new tensors: the same folder with them written in
    folder = tmp_path / "a2-new"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        (lora_dirs["a2"] / "adapter_config.json").read_text()
    )

    save_file(new, str(folder / "adapter_model.safetensors"))
    check_against_peft(peft_model(lora_dirs[None], folder), prompt, after)
    assert run("a1").num_cached_tokens == 64  # the other adapter's prefix stayed cached
    twin = run("twin")  # keeps the old tensors, and their cached prefix
    assert twin.num_cached_tokens == 64 and twin.outputs[0].token_ids == before.outputs[0].token_ids
    with pytest.raises(RequestError, match="all of the adapter"):
        llm.update_lora("a2", dict(list(new.items())[:2]))


def test_bad_adapters_get_their_own_error(lora_llm, lora_dirs, tmp_path, tokenizer):
    def code_of(lr: LoRARequest, params=GREEDY) -> tuple[str, str]:
        with pytest.raises(RequestError) as e:
            lora_llm.generate([[5, 6, 7]], params, lora_request=lr, use_tqdm=False)
        return e.value.code, str(e.value)

    code, msg = code_of(LoRARequest("gone", 9, str(tmp_path / "missing")))
    assert code == errors.INVALID_LORA and "no adapter folder" in msg
    code, msg = code_of(LoRARequest("big", 9, str(lora_dirs["rank32"])))
    assert code == errors.INVALID_LORA and "max_lora_rank=32" in msg
    other = tmp_path / "other-base"  # a Llama of hidden size 32, not 64
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    mismatch = make_adapter(other, tmp_path / "mismatch", seed=1, r=4, target_modules=["q_proj"])
    code, msg = code_of(LoRARequest("mismatch", 9, str(mismatch)))
    assert code == errors.INVALID_LORA and "another base model" in msg
    unknown = GREEDY.clone()
    unknown.lora_name = "never-loaded"
    code, msg = code_of(None, unknown)
    assert code == errors.MODEL_NOT_FOUND and "never-loaded" in msg
    # Nothing else lost: an engine with requests queued refuses the bad one alone.
    eng = lora_llm.engine
    eng.add_request("good", [5, 6, 7, 8], GREEDY)
    with pytest.raises(RequestError):
        eng.add_request("bad", [5, 6, 7, 8], unknown)
    done = []
    while eng.has_unfinished():
        done += eng.step()
    assert [o.request_id for o in done] == ["good"] and len(done[0].outputs[0].token_ids) == 10


def test_max_loras_replaces_the_least_recently_used_idle_adapter(lora_dirs):
    llm = LLM(str(lora_dirs[None]), dtype="float32", enable_lora=True, max_loras=2)
    for name in ("a1", "a2", "a3"):  # a3 replaces a1, idle and used least recently
        llm.generate([[5, 6, 7]], GREEDY, lora_request=lora(lora_dirs, name), use_tqdm=False)
    assert sorted(lr.lora_name for lr in llm.list_loras()) == ["a2", "a3"]
    with pytest.raises(RequestError, match="max_loras=2"):  # one call, three adapters
        llm.generate(
            [[5, 6, 7]] * 3,
            GREEDY,
            lora_request=[lora(lora_dirs, n) for n in ("a1", "a2", "a4")],
            use_tqdm=False,
        )
    llm.remove_lora("a2")
    assert [lr.lora_name for lr in llm.list_loras()] == ["a3"]


def test_an_engine_without_lora_says_how_to_turn_it_on(lora_dirs):
    llm = LLM(str(lora_dirs[None]), dtype="float32")
    with pytest.raises(RequestError, match="enable_lora"):
        llm.generate([[5, 6, 7]], GREEDY, lora_request=lora(lora_dirs, "a1"), use_tqdm=False)
