"""PrefixflowLM: lm-evaluation-harness's model interface on the offline engine (`LLM`).

lm-eval scores a multiple-choice question as one request per choice, each repeating the
few-shot header and the question. Each method here sends all of its requests to the engine
in one generate call, so that requests sharing a prefix run together and the prefix is
computed once; lm-eval's batch_size means nothing here. Exact duplicates are sent once.

Scores match lm-eval's transformers backend (HFLM) because the tokens are the same:
context and continuation are encoded as one text and split where the continuation starts,
trailing spaces of the context moving to the continuation (lm-eval's TemplateLM); an empty
context is the prefix token (BOS, else EOS); add_bos_token and a text that already starts
with BOS are handled as HFLM does; inputs longer than max_length lose their oldest tokens.

Registered with lm-eval under the name "prefixflow" when this module is imported:

    lm_eval.simple_evaluate(model="prefixflow", model_args="pretrained=PATH,dtype=float32", ...)
    lm_eval.simple_evaluate(model=PrefixflowLM(pretrained=PATH, dtype="float32"), ...)
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

try:
    # get_model() fills an empty registry with lm-eval's own models: registering ours into
    # an empty one first would leave "hf", "local-completions" and the others unknown.
    import lm_eval.models  # noqa: F401
    from jinja2.exceptions import TemplateError
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (
        handle_stop_sequences,
        has_bos_prefix,
        normalize_gen_kwargs,
        postprocess_generated_text,
    )
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra is missing
    raise ImportError(
        f"prefixflow's lm-evaluation-harness model needs lm-eval: pip install 'prefixflow[eval]' ({e})"
    ) from e

from prefixflow.llm import LLM
from prefixflow.request import RequestOutput
from prefixflow.sampling_params import SamplingParams
from prefixflow.tokenizer import load_chat_template

if TYPE_CHECKING:
    from lm_eval.api.instance import Instance

logger = logging.getLogger("prefixflow")

# Generation settings a task may give that SamplingParams takes under the same name.
_SAMPLING_KEYS = (
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "min_tokens",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@register_model("prefixflow")
class PrefixflowLM(TemplateLM):
    """lm-eval's `LM` on a prefixflow engine: loglikelihood, loglikelihood_rolling and
    generate_until, scored as lm-eval's `hf` model scores them.

    pretrained: a model folder, .gguf file or Hub id (default: the embedded model); dtype
    and every other engine option (`LLM`'s keywords, e.g. kv_cache_memory) pass through.
    llm: an engine already loaded, in place of pretrained and engine options.
    max_length: most tokens one scored window or prompt holds (default: the engine's
    context, less the two positions a scored window needs beyond it). max_gen_toks,
    add_bos_token, prefix_token_id and chat_template_args as lm-eval's `hf` model takes
    them; batch_size, max_batch_size and device are accepted and unused.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        chat_template_args: dict[str, Any] | None = None,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        llm: LLM | None = None,
        **engine_options: Any,
    ) -> None:
        super().__init__()
        if llm is None:
            model = engine_options.pop("model", None)
            if pretrained is not None and model is not None and model != pretrained:
                raise ValueError(f"pretrained ({pretrained!r}) and model ({model!r}) differ")
            if dtype is not None:
                engine_options["dtype"] = dtype
            llm = LLM(model=pretrained or model, **engine_options)
        elif pretrained is not None or dtype is not None or engine_options:
            raise ValueError(
                "give an engine already loaded (llm) or the options to load one "
                "(pretrained, dtype, engine options), not both"
            )
        self.llm = llm
        self.batch_size = batch_size  # the engine forms its own batches
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.chat_template_args = dict(chat_template_args or {})
        template = llm.config.chat_template
        self._chat_template = load_chat_template(template) if template is not None else None
        tokenizer = llm.get_tokenizer()
        if add_bos_token is not None:  # HFLM loads its tokenizer with add_bos_token
            tokenizer = copy.deepcopy(tokenizer)  # the engine's own stays as it is
            tokenizer.add_bos_token = add_bos_token
        self.tokenizer = tokenizer

    # What lm-eval reads of a model.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: the prefix_token_id option, else BOS,
        else EOS (HFLM's)."""
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.llm.engine.max_model_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        return {"model_name": self.llm.engine.model_name, "model_dtype": self.llm.config.dtype}

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """HFLM's encoding: the tokenizer's own special tokens unless add_special_tokens or
        add_bos_token say otherwise, and none before a text that already starts with the
        prefix token's text (a chat template writes its own BOS)."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The conversation as prompt text, by the engine's chat_template option, else the
        model's; a template that refuses a system message gets none (as HFLM does)."""
        options: dict[str, Any] = dict(
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            **self.chat_template_args,
        )
        if self._chat_template is not None:
            options["chat_template"] = self._chat_template
        try:
            return self.tokenizer.apply_chat_template(chat_history, **options)
        except TemplateError:
            logger.warning("the chat template refused these messages; retrying without system")
            history = [m for m in chat_history if m["role"] != "system"]
            return self.tokenizer.apply_chat_template(history, **options)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template and self._chat_template is not None:
            return self._chat_template
        return super().chat_template(chat_template)

    # The three request types.

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's logprobs, whether each of its tokens is the most
        likely) per (cache key, context ids, continuation ids), as HFLM scores them: the
        input cut to its last max_length + 1 tokens."""
        window = self._window
        unique: dict[tuple[int, ...], int] = {}  # (start, *prompt) -> its index in the call
        keys = []
        for _, context, continuation in requests:
            if len(continuation) > window:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than max_length "
                    f"({window}); raise max_length or shorten the continuation"
                )
            whole = (context + continuation)[-(window + 1) :]
            key = (len(whole) - len(continuation), *whole)
            keys.append(key)
            unique.setdefault(key, len(unique))
        params = [
            # logprob_start_len: the engine keeps no logprobs before the continuation
            SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1, logprob_start_len=k[0])
            for k in unique
        ]
        outs = self.llm.generate([list(k[1:]) for k in unique], params, use_tqdm=not disable_tqdm)
        scores = [_score(out, k[0]) for out, k in zip(outs, unique, strict=True)]
        results = []
        for (cache_key, _, _), key in zip(requests, keys, strict=True):
            answer = scores[unique[key]]
            results.append(answer)
            if cache_key is not None:  # rolling windows are cached per text by their caller
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Each text's loglikelihood in disjoint rolling windows of max_length tokens, the
        first conditioned on the prefix token (HFLM's windows); all windows in one call."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self._window,
                    context_len=1,
                ),
            ):
                windows.append((None, context, continuation))
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation until a stop string, EOS or max_gen_toks: greedy
        unless the task samples (do_sample, temperature); cut at the first stop string."""
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_tokens = int(kwargs.pop("max_gen_toks"))
            room = min(self.max_length, self.llm.engine.max_model_len) - max_tokens
            if room <= 0:
                raise ValueError(
                    f"max_gen_toks ({max_tokens}) leaves no room for a prompt in max_length "
                    f"({self.max_length}); lower max_gen_toks"
                )
            ids = self.tok_encode(context, left_truncate_len=room)  # HFLM keeps the end
            prompts.append(ids or [self.prefix_token_id])
            params.append(_sampling_params(kwargs, until, max_tokens))
            stops.append(until)
        outs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        results = []
        for req, out, until in zip(requests, outs, stops, strict=True):
            text = postprocess_generated_text(out.outputs[0].text, until, None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results

    @property
    def _window(self) -> int:
        """Most tokens a scored window feeds the model (HFLM's max_length). The engine
        needs two positions more: the last scored token is in the prompt, and the one
        output token every request generates."""
        return min(self.max_length, self.llm.engine.max_model_len - 2)


def _score(out: RequestOutput, start: int) -> tuple[float, bool]:
    """The sum of the prompt's logprobs from `start` on, and whether each was rank 1."""
    total, greedy = 0.0, True
    for token, entry in zip(out.prompt_token_ids[start:], out.prompt_logprobs[start:], strict=True):
        logprob = entry[token]
        total += logprob.logprob
        greedy = greedy and logprob.rank == 1
    return total, greedy


def _sampling_params(kwargs: dict[str, Any], until: list[str], max_tokens: int) -> SamplingParams:
    """A task's normalized generation settings as SamplingParams; settings prefixflow has
    no equal of are named in a warning and left out."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    chosen = {k: kwargs.pop(k) for k in _SAMPLING_KEYS if k in kwargs}
    if kwargs:
        logger.warning("prefixflow ignores these generation settings: %s", sorted(kwargs))
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature if do_sample else 0.0,
        stop=[s for s in until if s],
        **chosen,
    )
