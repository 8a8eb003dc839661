"""Model formats (GGUF, safetensors, sharded) and the supported architectures."""

from __future__ import annotations

import pytest
import torch

from prefixflow import LLM, SamplingParams
from prefixflow.attention.step_layout import SeqLayout, StepLayout
from prefixflow.engine.engine import Engine
from prefixflow.model.registry import UnsupportedArchitectureError
from tests.model_folders import TINY_LLAMA

pytestmark = pytest.mark.slow


def export_sharded(hf_model, tokenizer, folder, shards: int) -> None:
    """A Hugging Face folder of transformers' own dequantised weights, in several shards
    (transformers refuses save_pretrained on a GGUF-loaded model)."""
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    index = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / fname), metadata={"format": "pt"})
        index.update(dict.fromkeys(part, fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    cfg = hf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    tokenizer.save_pretrained(folder)


def prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """(L, V) logits of every prompt position, through prefixflow's own model and cache."""
    page_size = engine.scheduler.kv.pool.page_size
    pages = engine.scheduler.kv.pool.allocate(-(-len(ids) // page_size))
    try:
        layout = StepLayout(
            page_size=page_size,
            slot_mapping=torch.tensor(
                [pages[p // page_size] * page_size + p % page_size for p in range(len(ids))]
            ),
            seqs=[SeqLayout(0, len(ids), len(ids), pages)],
        )
        runner = engine.runner
        meta = runner.backend.prepare(layout)
        hidden = engine.runner.model(
            torch.tensor(ids), torch.arange(len(ids)), meta, runner.kv_cache, runner.backend
        )
        return engine.runner.model.compute_logits(hidden).float()
    finally:
        engine.scheduler.kv.pool.release(pages)


def test_gguf_and_sharded_safetensors_export_give_the_same_logits(
    llm_f32, hf_model, tokenizer, tmp_path, prompts
):
    export_sharded(hf_model, tokenizer, tmp_path, shards=3)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    exported = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="256MiB")
    ids = prompts[-2]["ids"]
    a = prompt_logits(llm_f32.engine, ids)
    b = prompt_logits(exported.engine, ids)
    assert a.shape == (len(ids), hf_model.config.vocab_size)
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    # and the transformers forward on its own weights agrees too
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert torch.allclose(a, ref, atol=1e-3, rtol=0), (a - ref).abs().max()


def _tiny(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=49152, **TINY_LLAMA)
    if kind == "llama3":
        return LlamaConfig(
            **common,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 128,
            },
        )
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    return Qwen2Config(**common)


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2"])
def test_tiny_architectures_match_transformers(kind, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _tiny(kind)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    if kind == "qwen2":  # make the q/k/v biases matter
        for layer in ref.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    ref.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0

    llm = LLM(model=str(tmp_path), dtype="float32", kv_cache_memory="64MiB")
    prompts = [[5, 17, 300, 42], list(range(100, 160)), list(range(1000, 1300, 3))]
    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        use_tqdm=False,
    )
    for p, o in zip(prompts, outs, strict=True):
        with torch.inference_mode():
            want = ref.generate(
                torch.tensor([p]),
                max_new_tokens=24,
                do_sample=False,
                attention_mask=torch.ones(1, len(p), dtype=torch.long),
            )
        assert o.outputs[0].token_ids == want[0, len(p) :].tolist()


def test_unsupported_architecture_is_refused_by_name(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(
        tmp_path
    )
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*Gemma3ForCausalLM"):
        LLM(model=str(tmp_path))


def test_missing_model_path_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        LLM(model=str(tmp_path / "nope"))


def test_bfloat16_stays_close_to_float32(llm_f32, prompts):
    from prefixflow.utils.hardware import cpu_has_fast_bf16, resolve_dtype

    assert resolve_dtype("auto") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    bf16 = LLM(dtype="bfloat16", kv_cache_memory="256MiB")
    assert bf16.engine.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = prompts[-1]["ids"]
    a = torch.log_softmax(prompt_logits(llm_f32.engine, ids), -1)
    b = torch.log_softmax(prompt_logits(bf16.engine, ids), -1)
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree
    # the probability the float32 model gives its own top token, as seen by bfloat16
    top = a.argmax(-1, keepdim=True)
    assert (a.gather(-1, top) - b.gather(-1, top)).abs().median() < 0.1
    out = bf16.generate(
        ["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )
    assert "Paris" in out[0].outputs[0].text


def test_longrope_context_stops_at_the_original_length():
    """transformers rotates a sequence past the original length by its long factors; keys
    cached under the short ones would then be wrong, so the context stops there."""
    from transformers import Phi3Config

    from prefixflow.model.loader import max_model_len

    rope = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8}
    rope.update(long_factor=[4.0] * 8)
    cfg = Phi3Config(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        rope_parameters=rope,
    )
    assert max_model_len(cfg) == 64
    assert max_model_len(Phi3Config(hidden_size=64, num_attention_heads=4)) == 4096
