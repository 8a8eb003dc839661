"""A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) -> its
low-rank pairs per module, each with its scale, and a digest of them.

What PEFT's LoRA computes, and no more: y = W x + (alpha / r) B A x (alpha / sqrt(r) with
use_rslora), with rank_pattern / alpha_pattern per module. Variants that compute something
else (DoRA, LoRA biases, modules_to_save, fan_in_fan_out, embedding adapters) are refused
with a message, never run approximately.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixflow import errors
from prefixflow.errors import RequestError

_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.\w+)?\.weight$"
)
_REFUSED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D models)",
    "modules_to_save": "modules_to_save (whole modules trained beside the adapter)",
}


@dataclass
class LoRAPair:
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scale: float


@dataclass
class AdapterTensors:
    """module name (as in the base checkpoint, e.g. model.layers.0.self_attn.q_proj) ->
    its pair; key: a digest of the tensors and scales, which names the adapter's KV."""

    pairs: dict[str, LoRAPair]
    key: str
    config: dict  # adapter_config.json: an update by tensors alone keeps its scales

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def rank(self) -> int:
        return max(p.a.shape[0] for p in self.pairs.values())

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted({m.rsplit(".", 1)[-1] for m in self.pairs}))


def bad(name: str, message: str) -> RequestError:
    return RequestError(f"LoRA adapter {name!r}: {message}", "lora_request", errors.INVALID_LORA)


def adapter_folder(path: str | os.PathLike, name: str) -> Path:
    """The folder of an adapter: a local path, or a Hub id from the Hugging Face cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.exists() or str(path).count("/") != 1:
        raise bad(name, f"no adapter folder at {str(path)!r}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception as e:
        raise bad(
            name, f"{str(path)!r} is no folder, nor a Hub id in the Hugging Face cache ({e})"
        ) from e


def read_adapter(path: str | os.PathLike, name: str) -> AdapterTensors:
    """Read and check a PEFT LoRA folder. Raises RequestError saying what is wrong."""
    folder = adapter_folder(path, name)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise bad(name, f"{folder} has no adapter_config.json; is it a PEFT adapter folder?")
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise bad(name, f"{cfg_path} is not valid JSON ({e})") from e
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise bad(name, f"{folder} has no adapter_model.safetensors (only safetensors is read)")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise bad(name, f"cannot read {weights}: {e}") from e
    return adapter_tensors(tensors, cfg, name)


def adapter_tensors(tensors: Mapping[str, torch.Tensor], cfg: Mapping, name: str) -> AdapterTensors:
    """Pairs and scales from PEFT's tensor names and adapter config."""
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise bad(name, f"peft_type {peft_type} is not LoRA")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise bad(name, f"{what} is not supported; merge it into the base model instead")
    if cfg.get("bias", "none") != "none":
        raise bad(name, f"bias={cfg['bias']!r} is not supported (only bias='none')")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for tname, t in tensors.items():
        m = _TENSOR.match(tname)
        if m is None:
            raise bad(name, f"tensor {tname!r} is not a LoRA A or B weight; it cannot be run")
        halves.setdefault(m["module"], {})[m["ab"]] = t
    if not halves:
        raise bad(name, "it holds no LoRA tensors")
    alpha = float(cfg.get("lora_alpha", cfg.get("r", 8)))
    patterns = cfg.get("alpha_pattern") or {}
    pairs = {}
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise bad(name, f"{module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"].float(), ab["B"].float()
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise bad(name, f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair")
        mod_alpha = next(
            (float(v) for k, v in patterns.items() if re.match(rf"(.*\.)?{k}$", module)), alpha
        )
        scale = mod_alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        pairs[module] = LoRAPair(a, b, scale)
    return AdapterTensors(pairs, digest(pairs), dict(cfg))


def digest(pairs: Mapping[str, LoRAPair]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for module in sorted(pairs):
        p = pairs[module]
        h.update(f"{module}:{p.scale!r}:{tuple(p.a.shape)}:{tuple(p.b.shape)}".encode())
        h.update(p.a.contiguous().numpy().tobytes())
        h.update(p.b.contiguous().numpy().tobytes())
    return h.hexdigest()
