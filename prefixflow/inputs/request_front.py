"""RequestFront: everything a request goes through before it is queued, in one place.

It holds what checking a request needs of the model (tokenizer, EOS ids, context length,
vocabulary, the grammar compiler, the chat template) and turns a prompt (text or ids, or a
conversation to template: inputs/chat_template.py) with its parameters into the Requests
of its n samples: tokenize, truncate, check (inputs/checks.py), compile a structured
output's grammar once. The engine, the Ray driver and `analyze` all build
one, so a request is refused the same way whichever way it came in. It loads no weights.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from prefixflow import errors
from prefixflow.config import EngineConfig, LimitsConfig
from prefixflow.errors import RequestError
from prefixflow.inputs.chat_template import ChatTemplateOptions, check_chat_options
from prefixflow.inputs.checks import check_request, truncated
from prefixflow.inputs.limits import KVBudget, check_counts, check_limits
from prefixflow.lora.registry import LoRARegistry
from prefixflow.model.loader import (
    ModelSource,
    eos_token_ids,
    load_hf_config,
    load_tokenizer,
    max_model_len,
    resolve_model,
)
from prefixflow.model.registry import arch_of
from prefixflow.parsers.reasoning import check_reasoning_parser
from prefixflow.parsers.tool_calls import check_tool_call_parser
from prefixflow.request import CompletionOutput, FinishReason, Request, RequestOutput
from prefixflow.sampling_params import SamplingParams
from prefixflow.structured.compiler import GrammarCompiler
from prefixflow.tokenizer import TextCodec, check_chat_template, load_chat_template


class RequestFront:
    def __init__(
        self,
        model: str | None = None,
        max_len: int | None = None,
        runs_model: bool = True,
        limits: LimitsConfig | None = None,
        chat_template: str | None = None,
        revision: str | None = None,
        served_model_name: str | None = None,
        reasoning_parser: str | None = None,
        tool_call_parser: str | None = None,
    ) -> None:
        """model: a folder, .gguf file or Hub id (None: the embedded default); max_len: a
        cap on prompt + output tokens below the model's context; runs_model: refuse an
        architecture prefixflow cannot run (off where only the tokenizer is needed);
        limits: what one request may ask (inputs/limits.py); chat_template: a template
        file or text in place of the model's (a missing file or a syntax error is a
        ValueError naming it, before the model loads); revision: of a Hub id;
        served_model_name: its name in the OpenAI API (default: the file or folder's);
        reasoning_parser, tool_call_parser: how chat outputs are parsed (parsers/)."""
        check_reasoning_parser(reasoning_parser)
        check_tool_call_parser(tool_call_parser)
        self.reasoning_parser = reasoning_parser
        self.tool_call_parser = tool_call_parser
        self.limits = limits or LimitsConfig()
        template = load_chat_template(chat_template) if chat_template is not None else None
        self.kv: KVBudget | None = None  # known once the engine sized its KV cache
        self.source: ModelSource = resolve_model(model, revision)
        self.model_name = served_model_name or self.source.name
        self.hf_config = load_hf_config(self.source)
        if runs_model:  # refuse an unsupported model, or a config it cannot run, first
            arch_of(self.hf_config)
        self.codec = TextCodec(load_tokenizer(self.source), template)
        self.eos_token_ids = eos_token_ids(self.source, self.hf_config, self.codec.tokenizer)
        self.vocab_size: int = self.hf_config.vocab_size
        self.max_model_len = max_model_len(self.hf_config)
        self.limit_context(max_len or self.max_model_len)
        self._compiler: GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()
        # The LoRA adapters requests may name (the engine loads them); None: LoRA is off.
        self.loras: LoRARegistry | None = None
        # run-batch tokenizes a window's long prompts together (TextCodec.prefetch).
        self.batch_tokenize = True

    @classmethod
    def from_config(cls, config: EngineConfig, runs_model: bool = True) -> RequestFront:
        """The front of an engine's options: its model, context cap, limits and template."""
        front = cls(
            config.model,
            config.max_model_len,
            runs_model,
            limits=config.limits,
            chat_template=config.chat_template,
            revision=config.revision,
            reasoning_parser=config.reasoning_parser,
            tool_call_parser=config.tool_call_parser,
            served_model_name=config.served_model_name,
        )
        if config.enable_lora:
            front.loras = LoRARegistry(config.max_loras, config.max_lora_rank)
        front.batch_tokenize = config.batch_tokenize
        return front

    # ---- LoRA adapters ----
    def adapter_for_model(self, model: str | None) -> str | None:
        """The adapter an OpenAI body's `model` names; None for the base model. With LoRA
        off any name means the base model (clients send their own); with it on, a name
        that is neither the base nor a loaded adapter is refused."""
        if model is None or self.loras is None or model in (self.model_name, self.source.name):
            return None
        if model not in self.loras:
            served = ", ".join([self.model_name, *sorted(a.name for a in self.loras.adapters())])
            raise RequestError(
                f"the model {model!r} does not exist here; it serves {served}",
                "model",
                errors.MODEL_NOT_FOUND,
            )
        return model

    def lora_key(self, params: SamplingParams) -> str | None:
        """The key of the adapter a request runs under (RequestError if none is loaded)."""
        name = params.lora_name
        if name is None:
            return None
        if self.loras is None:
            raise RequestError(
                f"LoRA adapter {name!r} asked of an engine without LoRA; start it with "
                "enable_lora=True (--enable-lora)",
                "lora_request",
                errors.INVALID_LORA,
            )
        return self.loras.get(name).key

    def limit_context(self, max_len: int) -> None:
        """Requests hold at most max_len tokens (another model of the engine holds fewer)."""
        self.max_model_len = min(self.max_model_len, max_len)
        self.codec.limit_text(self.max_model_len)

    def tokens(self, text: str, params: SamplingParams, special: bool = True) -> list[int]:
        """A text prompt's ids (special: the tokenizer's own BOS). One that cannot fit the
        context is refused before it is tokenized, unless truncate_prompt_tokens keeps
        only its end (then only its end is tokenized)."""
        keep_end = params.truncate_prompt_tokens is not None
        return self.codec.encode(text, special, keep_end) if text else []

    def check_counts(self, params: SamplingParams, num_prompts: int) -> None:
        """The limits that need no token (n x prompts, logprobs, stop, logit_bias, a
        structured output's size): asked before any prompt is tokenized."""
        check_counts(params, num_prompts, self.limits, self.kv)

    def chat_options(
        self,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
    ) -> ChatTemplateOptions:
        """A chat request's template options, checked (types, both prompts at once,
        variables the template call keeps for itself) before anything is templated.
        Raises RequestError."""
        options = ChatTemplateOptions(
            chat_template,
            chat_template_kwargs,
            add_generation_prompt,
            continue_final_message,
            tuple(tools) if tools else None,
        )
        check_chat_options(options, self.codec.template_call_names)
        return options

    def chat_prompt(
        self, messages: list[dict], options: ChatTemplateOptions, params: SamplingParams
    ) -> tuple[str, list[int]]:
        """A conversation's prompt (text, ids): templated by the request's template, the
        engine's or the model's, then tokenized as a text prompt is (the template holds
        the special tokens). Options from chat_options. Raises RequestError."""
        text = self.chat_text(messages, options)
        return text, self.tokens(text, params, special=False)

    def chat_text(self, messages: list[dict], options: ChatTemplateOptions) -> str:
        """A conversation's prompt text, templated as chat_prompt templates it."""
        try:
            if options.chat_template is not None:
                check_chat_template(options.chat_template, "chat_template")
        except ValueError as e:
            raise RequestError(str(e), "chat_template") from e
        try:
            text = self.codec.apply_chat_template(
                messages,
                add_generation_prompt=options.add_generation_prompt,
                chat_template=options.chat_template,
                continue_final_message=options.continue_final_message,
                chat_template_kwargs=options.chat_template_kwargs,
                tools=list(options.tools) if options.tools else None,
            )
        except ValueError as e:  # the template refused the messages
            raise RequestError(str(e), "messages") from e
        return text

    def check(self, ids: list[int], params: SamplingParams) -> None:
        """Every check but the counted limits (check_counts, asked first) and the grammar's,
        from ids alone (the server's, before a request takes room in its queue)."""
        _, ids = truncated(None, ids, params, self.max_model_len)
        check_limits(len(ids), params, self.limits, self.max_model_len, self.kv)
        check_request(None, ids, params, self.max_model_len, self.vocab_size)

    def set_kv_budget(self, num_pages: int, page_size: int) -> None:
        """The KV cache's size: the default bound of n and of a request's tokens."""
        self.kv = KVBudget(num_pages, page_size)

    def grammars(self) -> GrammarCompiler:
        """The grammar compiler, built on first use (it converts the tokenizer once)."""
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(
                    self.codec, self.vocab_size, sorted(self.eos_token_ids)
                )
            return self._compiler

    def prompt(
        self, prompt: str | list[int], params: SamplingParams, prompt_text: str | None = None
    ) -> tuple[str | None, list[int]]:
        """The prompt as it will run: (its text if known, its token ids). Text is tokenized;
        ids come with the text they came from, if any. Raises RequestError."""
        check_counts(params, 1, self.limits, self.kv)  # before any tokenizing
        if isinstance(prompt, str):
            text, ids = prompt, self.tokens(prompt, params)
        else:
            text, ids = prompt_text, list(prompt)
        return self._checked(text, ids, params)

    def _checked(
        self, text: str | None, ids: list[int], params: SamplingParams
    ) -> tuple[str | None, list[int]]:
        """The checks, cheapest first: the limits count, the request's own check reads its
        token ids, and a grammar is compiled only for a request that passed both."""
        text, ids = truncated(text, ids, params, self.max_model_len)
        check_limits(len(ids), params, self.limits, self.max_model_len, self.kv)
        check_request(text, ids, params, self.max_model_len, self.vocab_size)
        self.lora_key(params)
        if params.structured_outputs is not None:
            self.grammars().check(params.structured_outputs)
        return text, ids

    def samples(self, request_id: str, ids: list[int], params: SamplingParams) -> list[Request]:
        """The Requests of a prompt's n samples; prompt logprobs come from the first only."""
        out = [self._sample(request_id, ids, params, i) for i in range(params.n)]
        out[0].num_prompt_logprobs = max(0, params.logprob_start_len - 1)
        for req in out[1:]:
            req.num_prompt_logprobs = len(ids)
        return out

    def resumed(
        self, request_id: str, prev: RequestOutput
    ) -> tuple[list[int], list[Request | CompletionOutput]]:
        """The prompt ids and samples of a partial output to resume (continue_from): each
        unfinished sample runs on from its tokens so far; finished ones stay as they were."""
        params = prev.sampling_params
        if params is None or prev.finished:
            raise RequestError("continue_from takes a partial output (finish_reason 'partial')")
        check_counts(params, 1, self.limits, self.kv)
        _, ids = self._checked(prev.prompt, list(prev.prompt_token_ids), params)
        samples: list[Request | CompletionOutput] = []
        for i, before in enumerate(prev.outputs):
            if before.finish_reason != FinishReason.PARTIAL:
                samples.append(before)
                continue
            req = self._sample(request_id, ids, params, i)
            req.token_ids += before.token_ids
            req.token_versions = list(before.weight_versions or [])
            if prev.prompt_logprobs is not None:  # the rest from the first resumed sample
                first = not any(isinstance(s, Request) for s in samples)
                req.num_prompt_logprobs = len(prev.prompt_logprobs) - 1 if first else len(ids)
            samples.append(req)
        return ids, samples

    def _sample(self, request_id: str, ids: list[int], params: SamplingParams, i: int) -> Request:
        """The i-th of a request's n samples: its own id and seed."""
        child_params = params if params.n == 1 else params.for_sample(i)
        rid = request_id if params.n == 1 else f"{request_id}#{i}"
        return Request(
            rid, ids, child_params, self.eos_token_ids, self.max_model_len, self.lora_key(params)
        )
