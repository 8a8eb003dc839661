"""Find a model's files and load its config, tokenizer and weights.

A model is a Hugging Face folder (config.json, tokenizer files, safetensors weights) or a
single .gguf file, whose config and tokenizer transformers reads from the GGUF metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixflow.model.default import default_model_path
from prefixflow.utils.cache_dir import cache_root


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the folder, or the .gguf file

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"

    @property
    def name(self) -> str:
        return self.path.stem if self.is_gguf else self.path.name


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(path)!r} does not exist; give a Hugging Face model folder or a .gguf "
            "file (prefixflow never downloads weights)"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; is it a Hugging Face model folder?")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf file")
    return ModelSource(path.resolve())


def load_hf_config(src: ModelSource):
    from transformers import AutoConfig

    return _load_converted(src, AutoConfig, "config.json")


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    return _load_converted(src, AutoTokenizer, "tokenizer.json")


def _load_converted(src: ModelSource, auto_cls, marker: str):
    """Load with a transformers Auto class. What it converts from GGUF metadata (seconds of
    work) is saved once in a cache folder keyed by the file, and read from there after."""
    if not src.is_gguf:
        return auto_cls.from_pretrained(str(src.path))
    cache = gguf_cache_dir(src.path)
    if (cache / marker).exists():
        try:
            return auto_cls.from_pretrained(str(cache))
        except Exception:  # a damaged cache is rebuilt below
            pass
    obj = auto_cls.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
    try:
        obj.save_pretrained(str(cache))
    except OSError:
        pass  # a read-only home only costs the conversion next time
    return obj


def gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / key


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
    n = int(hf_config.max_position_embeddings)
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", hf_config.model_type == "mistral")
    if window and uses_window:
        # We attend to the full context; beyond the window that would differ from the model.
        n = min(n, int(window))
    return n
