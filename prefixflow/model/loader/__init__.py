"""Find a model's files and load its config, tokenizer and weights.

A model is a Hugging Face folder (config.json, tokenizer files, safetensors weights), a
single .gguf file (its config rebuilt from the GGUF metadata: gguf_config.py, or by
transformers; its tokenizer by transformers), or a Hub id resolved to either (hub.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixflow.model.default import default_model_path
from prefixflow.model.loader.gguf_cache import gguf_cache_dir, prune, record_source


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the folder, or the .gguf file
    hub_id: str | None = None  # the Hub id it was resolved from, if any

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def name(self) -> str:
        if self.hub_id is not None:  # a snapshot folder is named by its commit hash
            return self.hub_id
        return self.path.stem if self.is_gguf else self.path.name


def resolve_model(model: str | os.PathLike | None, revision: str | None = None) -> ModelSource:
    """The files of a model: a local folder or .gguf file (used as is), a Hub id `org/name`
    or `org/name/file.gguf` (found in, or downloaded into, huggingface_hub's cache at
    `revision`: a branch, tag or commit, default main; see loader/hub.py), or None for the
    embedded default model."""
    from prefixflow.model.loader.hub import download, looks_like_hub_id

    path = default_model_path() if model is None else Path(model).expanduser()
    hub_id = None
    if not path.exists():
        if not (isinstance(model, str) and looks_like_hub_id(model)):
            raise FileNotFoundError(
                f"model {str(path)!r} does not exist (prefixflow never downloads a path, only "
                "Hub ids); give a Hugging Face model folder, a .gguf file or a Hub id (org/name, "
                "or org/name/file.gguf)"
            )
        path, hub_id = download(model, revision), model
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf file")
    # a file keeps the name it was given: a Hub snapshot's files are links to blobs named
    # by their hash, without the .gguf
    path = path.resolve() if path.is_dir() else path.parent.resolve() / path.name
    return ModelSource(path, hub_id)


def load_hf_config(src: ModelSource):
    from transformers import AutoConfig

    def from_gguf():
        from prefixflow.model.loader.gguf_config import config_dict
        from prefixflow.model.loader.gguf_file import GGUFFile

        d = config_dict(GGUFFile(src.path))
        if d is None:  # not a family prefixflow runs: transformers' config, or its error
            return AutoConfig.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        return AutoConfig.for_model(**d)

    try:
        return _load_converted(src, AutoConfig, "config.json", from_gguf)
    except (OSError, ImportError):
        raise
    except Exception as e:  # transformers' own validation: a field of the wrong type
        raise ValueError(f"{src.path}: the model's config is not valid: {e}") from e


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    def from_gguf():
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        from prefixflow.model.loader.gguf_file import GGUFFile

        kwargs = {"gguf_file": src.path.name}
        arch = GGUFFile(src.path).architecture
        if _TRANSFORMERS_ARCH.get(arch, arch) in GGUF_SUPPORTED_ARCHITECTURES:
            return AutoTokenizer.from_pretrained(str(src.path.parent), **kwargs)
        # AutoTokenizer first converts the config, and refuses architectures transformers
        # has no config conversion for; the tokenizer itself does not depend on them
        from transformers import TokenizersBackend

        return TokenizersBackend.from_pretrained(str(src.path.parent), **kwargs)

    return _load_converted(src, AutoTokenizer, "tokenizer.json", from_gguf)


# GGUF architecture -> transformers' name for it, where they differ
_TRANSFORMERS_ARCH = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}


def _load_converted(src: ModelSource, auto_cls, marker: str, from_gguf):
    """Load with a transformers Auto class. What is converted from GGUF metadata (seconds
    of work) is saved once in a cache folder keyed by the file, and read from there after."""
    if not src.is_gguf:
        return auto_cls.from_pretrained(str(src.path))
    cache = gguf_cache_dir(src.path)
    record_source(cache, src.path)  # also its last use, for pruning
    if (cache / marker).exists():
        try:
            return auto_cls.from_pretrained(str(cache))
        except Exception:  # a damaged cache is rebuilt below
            pass
    obj = from_gguf()
    try:
        obj.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home only costs the conversion next time
    prune(keep=cache)
    return obj


def iter_weights(src: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    from prefixflow.model.loader.safetensors import iter_safetensors

    if not src.is_gguf:
        return iter_safetensors(src.path)
    return _dequantized_gguf(src, hf_config)


def _dequantized_gguf(src: ModelSource, hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """GGUF tensors, dequantised once and then read from a float32 safetensors copy in the
    cache (reading the GGUF takes seconds: its metadata alone has 100,000 strings)."""
    from safetensors.torch import save_file

    from prefixflow.model.loader.gguf import iter_gguf
    from prefixflow.model.loader.safetensors import iter_safetensors

    cache = gguf_cache_dir(src.path)
    record_source(cache, src.path)
    cached = cache / "weights" / "model.safetensors"
    if cached.exists():
        try:
            yield from iter_safetensors(cached.parent)
            return
        except Exception:  # damaged: convert again
            pass
    tensors = dict(iter_gguf(src.path, hf_config))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(cached)
    except OSError:
        pass
    prune(keep=cache)
    yield from tensors.items()


def eos_token_ids(src: ModelSource, hf_config, tokenizer) -> frozenset[int]:
    """Every id that ends generation: config, generation_config.json and tokenizer agree on it."""
    ids: set[int] = set()

    def add(x) -> None:
        if isinstance(x, int):
            ids.add(x)
        elif isinstance(x, list | tuple):
            ids.update(i for i in x if isinstance(i, int))

    add(getattr(hf_config, "eos_token_id", None))
    gen = src.path / "generation_config.json"
    if not src.is_gguf and gen.exists():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)


def max_model_len(hf_config) -> int:
    """The model's context. Sliding windows do not shorten it: attention honours them.

    With `longrope` (Phi-3.5, Phi-4-mini), transformers rotates a whole sequence by other
    factors once it is longer than the original context, so keys cached under one set
    would be wrong under the other; the context stops at the original length, where
    outputs are exact, until both tables are served."""
    from prefixflow.model.rope import rope_parameters

    n = int(hf_config.max_position_embeddings)
    params = rope_parameters(hf_config)
    if params.get("rope_type") == "longrope":
        original = params.get("original_max_position_embeddings") or getattr(
            hf_config, "original_max_position_embeddings", None
        )
        if original:
            n = min(n, int(original))
    return n
