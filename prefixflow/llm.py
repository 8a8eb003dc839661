"""LLM: the offline facade, shaped like vLLM's (generate, chat)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from prefixflow import errors
from prefixflow.config import EngineConfig
from prefixflow.engine.engine import Engine
from prefixflow.errors import RequestError
from prefixflow.inputs.tools import force_tool_call, plan_tools, tool_dicts
from prefixflow.lora.request import LoRARequest
from prefixflow.parsers.chat_output import ChatParsing, finish_reason, parse_chat
from prefixflow.request import RequestOutput
from prefixflow.runner.weight_update import Weights
from prefixflow.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Generate from a batch of prompts with the embedded default model or a given one.

    >>> llm = LLM()                                   # SmolLM2-135M-Instruct, embedded
    >>> outs = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    >>> outs[0].outputs[0].text
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        """`options`: any engine option (see `prefixflow.config.EngineConfig`, or the flags
        of `prefixflow run-batch --help`), by our name or vLLM's."""
        self.config = EngineConfig.from_options(model=model, **options)
        self.engine = Engine(self.config)
        self._next_id = 0

    def get_tokenizer(self):
        return self.engine.codec.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        *,
        min_finished: int | None = None,
        continue_from: Sequence[RequestOutput] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, token ids, or {"prompt_token_ids": [...]}).

        Outputs come back in the order of the prompts. A prompt that cannot run raises
        RequestError (a ValueError with an OpenAI error `code`) naming its index before any
        work starts.

        Partial rollouts (APRIL): with `min_finished=K`, return once K requests finished;
        the others come back unfinished (`finished=False`, finish_reason "partial" on each
        unfinished sample). Pass them as `continue_from` to resume them, before any new
        prompts in the output: seeded and greedy ones give exactly the tokens an
        uninterrupted run would, and read their tokens so far from the prefix cache while
        the weights are unchanged.

        lora_request: a LoRA adapter for every prompt, or a list with one (or None, the
        base model) per prompt, as in vLLM; each is loaded the first time (enable_lora).
        """
        items = _as_prompt_list(prompts) if prompts is not None else []
        params = self._with_lora(_as_params_list(sampling_params, len(items)), lora_request)
        resumed = [(None, None, prev) for prev in continue_from or []]
        fresh = [(p, None, None) for p in items]
        return self._run(resumed + fresh, [None] * len(resumed) + params, use_tqdm, min_finished)

    @property
    def weight_version(self) -> int:
        """Bumped by every update_weights; each output token records the one it ran under."""
        return self.engine.weight_version

    def update_weights(self, weights: Weights, in_flight: str = "recompute") -> None:
        """Load new weights into the model in place, without a reload.

        `weights`: (Hugging Face tensor name, tensor) pairs, some or all of the model's,
        or the path of a model folder or .gguf file of the same architecture (all of them).
        A bad name or shape raises ValueError and the old weights stay. The prefix cache
        never serves KV of older weights. Requests in flight (engine-level use, or a
        server): "recompute" runs them on under the new weights from their tokens so far,
        "abort" finishes them, "keep" lets them finish under the old weights.
        """
        self.engine.update_weights(weights, in_flight)

    # ---- LoRA adapters (enable_lora) ----
    def update_lora(self, name: str, weights: Any, in_flight: str = "recompute") -> None:
        """Replace a loaded adapter's tensors in place (RL that trains only an adapter):
        all of its PEFT-named A and B tensors, or a PEFT folder. Only its cached KV is
        dropped; in_flight as in update_weights."""
        self.engine.update_lora(name, weights, in_flight)

    def add_lora(self, lora_request: LoRARequest) -> None:
        self.engine.add_lora(lora_request)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def list_loras(self) -> list[LoRARequest]:
        return self.engine.list_loras()

    def _with_lora(
        self, params: list[SamplingParams], lora: LoRARequest | Sequence | None
    ) -> list[SamplingParams]:
        """Each prompt's params naming its adapter (loaded here, the first time)."""
        if lora is None:
            return params
        loras = [lora] * len(params) if isinstance(lora, LoRARequest) else list(lora)
        if len(loras) != len(params):
            raise ValueError(f"got {len(loras)} lora requests for {len(params)} prompts")
        names = {lr.lora_name for lr in loras if lr is not None}
        if len(names) > self.config.max_loras:  # loading the last would replace the first
            raise RequestError(
                f"this call names {len(names)} LoRA adapters, more than max_loras="
                f"{self.config.max_loras}; raise max_loras",
                "lora_request",
                errors.INVALID_LORA,
            )
        out, loaded = [], set()
        for i, (p, lr) in enumerate(zip(params, loras, strict=True)):
            if lr is not None:
                if lr not in loaded:  # once per adapter, not per prompt
                    try:
                        self.engine.add_lora(lr)
                    except RequestError as e:
                        raise e.with_prefix(f"prompt {i}: ") from e
                    loaded.add(lr)
                p = dataclasses.replace(p, lora_name=lr.lora_name)
            out.append(p)
        return out

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        *,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        min_finished: int | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to each conversation and generate (min_finished: as in
        generate). vLLM's template options, the same for every conversation:
        chat_template (its text; default: the engine's chat_template option, else the
        model's), add_generation_prompt, continue_final_message (leave the last message
        open for the model to continue; not with add_generation_prompt) and
        chat_template_kwargs (variables for the template). tools (OpenAI's function
        definitions) and tool_choice as on the server (inputs/tools.py): with a reasoning
        or tool-call parser, each output's text keeps the content and its reasoning_content
        and tool_calls are set. lora_request: as in generate. Raises RequestError before
        any work starts."""
        front = self.engine.front
        plan = plan_tools(
            tool_dicts(tools),
            tool_choice,
            None,
            front.reasoning_parser,
            front.tool_call_parser,
            front.codec.template_text(chat_template),
        )
        options = front.chat_options(
            chat_template,
            chat_template_kwargs,
            add_generation_prompt,
            continue_final_message,
            plan.tools,
        )
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._with_lora(_as_params_list(sampling_params, len(convs)), lora_request)
        if plan.structured is not None or plan.parsing.tool_parser == "mistral":
            params = [p.clone() for p in params]
            for p in params:
                force_tool_call(p, plan)
        items = []
        for i, (conv, p) in enumerate(zip(convs, params, strict=True)):
            try:
                text, ids = front.chat_prompt(conv, options, p)
            except RequestError as e:
                raise e.with_prefix(f"conversation {i}: ") from e
            items.append((ids, text, None))
        outputs = self._run(items, params, use_tqdm, min_finished)
        if plan.parsing.active:
            for out in outputs:
                if out.finished:  # a partial one stays raw, to be resumed
                    _parse_outputs(plan.parsing, out)
        return outputs

    def _run(
        self, items, params, use_tqdm: bool, min_finished: int | None = None
    ) -> list[RequestOutput]:
        eng = self.engine
        ids = []
        for i, ((prompt, text, prev), p) in enumerate(zip(items, params, strict=True)):
            rid = prev.request_id if prev is not None else str(self._next_id)
            if prev is None:
                self._next_id += 1
            try:
                eng.add_request(rid, prompt, p, prompt_text=text, continue_from=prev)
            except RequestError as e:
                for r in ids:
                    eng.abort(r)
                raise e.with_prefix(f"prompt {i}: ") from e
            ids.append(rid)
        results: dict[str, RequestOutput] = {}
        target = len(ids) if min_finished is None else min(min_finished, len(ids))
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        start_out, t0 = eng.stats.output_tokens, time.perf_counter()
        try:
            while len(results) < target and eng.has_unfinished():
                for out in eng.step():
                    results[out.request_id] = out
                    bar.update(1)
                dt = time.perf_counter() - t0
                if dt > 0:
                    bar.set_postfix(tok_s=f"{(eng.stats.output_tokens - start_out) / dt:.0f}")
        except BaseException:
            for r in ids:  # leave nothing queued for the next call
                eng.abort(r)
            raise
        finally:
            bar.close()
            eng.flush_kv_disk()  # so that the next process finds every page saved
        for r in ids:  # min_finished reached: hand the others back, resumable
            if r not in results:
                results[r] = eng.interrupt(r)
        return [results[r] for r in ids]


def _parse_outputs(parsing: ChatParsing, out: RequestOutput) -> None:
    """Reasoning and tool calls out of each sample's text, as the server's message has them;
    text keeps the content (token_ids stay the whole output)."""
    for c in out.outputs:
        message = parse_chat(parsing, c.text, out.prompt)
        c.text = message.content or ""
        c.reasoning_content = message.reasoning_content
        c.tool_calls = [call.body() for call in message.tool_calls] or None
        c.finish_reason = finish_reason(c.finish_reason, bool(message.tool_calls))


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str | dict):
        prompts = [prompts]
    elif prompts and isinstance(prompts, list) and isinstance(prompts[0], int):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                p = list(p["prompt_token_ids"])
            elif "prompt" in p:
                p = p["prompt"]
            else:
                raise RequestError("a dict prompt needs 'prompt' or 'prompt_token_ids'", "prompt")
        out.append(p)
    return out


def _as_params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling params for {n} prompts")
    return params
