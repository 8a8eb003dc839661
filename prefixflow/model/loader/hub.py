"""Hugging Face Hub ids, resolved to files in huggingface_hub's cache.

Two forms:
- `org/name`: a model repository; its config, tokenizer, generation and template files and
  its safetensors weights are fetched (not *.bin, *.gguf, *.pt or the rest).
- `org/name/file.gguf` (or `org/name/sub/dir/file.gguf`): one GGUF file of a repository,
  for the repositories that hold only GGUF files, one per quantisation. This is the file's
  path in the repository after the id, as in a `hf://org/name/file.gguf` URL; vLLM's
  `org/name:Q4_K_M` quantisation-tag form is not taken (it needs the repository's file list).

huggingface_hub does the work, and so honours its environment: HF_TOKEN, HF_HUB_CACHE /
HF_HOME (read here at each call, so a change after import counts too) and HF_HUB_OFFLINE,
where only the cache is looked at. Online, a short request first tells whether the Hub can
be reached: its client waits without limit on a connection that hangs, and a machine
without network should fail in seconds, with a message that says how to fetch the model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# what a model folder needs (*.json: config, generation config, tokenizer files, index)
ALLOW_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model", "merges.txt"]
_PROBE_TIMEOUT_S = 10.0
_REPO = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_REPO_ID = re.compile(_REPO)
_GGUF_ID = re.compile(rf"({_REPO})/(.+\.gguf)")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubModelNotFound(FileNotFoundError):
    pass


def looks_like_hub_id(model: str) -> bool:
    """`org/name` or `org/name/path/file.gguf`; never a path that starts at /, . or ~."""
    if model.startswith(("/", ".", "~")) or "\\" in model or "//" in model:
        return False
    return bool(_REPO_ID.fullmatch(model) or _GGUF_ID.fullmatch(model))


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads: HF_HUB_CACHE, else HF_HOME/hub, else its default."""
    from huggingface_hub import constants

    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def download(model_id: str, revision: str | None = None) -> Path:
    """The local path of a Hub id (a snapshot folder, or the GGUF file), from the cache or
    downloaded into it. HubModelNotFound names the id, the revision and the cache folder."""
    from huggingface_hub import hf_hub_download, snapshot_download

    if m := _GGUF_ID.fullmatch(model_id):
        repo_id, filename = m.group(1), m.group(2)
    else:
        repo_id, filename = model_id, None
    cache = hub_cache_dir()

    def fetch(local_only: bool) -> Path:
        if filename is not None:
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=cache,
                    local_files_only=local_only,
                    etag_timeout=_PROBE_TIMEOUT_S,
                )
            )
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache,
                allow_patterns=ALLOW_PATTERNS,
                # Mistral's repositories hold the weights twice; the loader reads the HF copy
                ignore_patterns=["consolidated*"],
                local_files_only=local_only,
                etag_timeout=_PROBE_TIMEOUT_S,
            )
        )

    online_error: Exception | None = None
    if not hub_offline():
        try:
            _probe(repo_id, revision)
            return fetch(local_only=False)
        except Exception as e:  # unreachable, unknown id, no access: the cache may still have it
            online_error = e
    try:
        return fetch(local_only=True)
    except Exception as e:
        raise HubModelNotFound(
            _not_found(model_id, repo_id, filename, revision, cache, online_error)
        ) from (online_error or e)


def _probe(repo_id: str, revision: str | None) -> None:
    """Raises unless the Hub answers for this repository and revision within the timeout."""
    from huggingface_hub import HfApi

    HfApi().repo_info(repo_id, revision=revision, timeout=_PROBE_TIMEOUT_S)


def _not_found(
    model_id: str,
    repo_id: str,
    filename: str | None,
    revision: str | None,
    cache: Path,
    online_error: Exception | None,
) -> str:
    rev = revision or "main"
    how = f"download {repo_id}" + (f" {filename}" if filename else "")
    how += f" --revision {revision}" if revision else ""
    where = (
        "HF_HUB_OFFLINE is set, so only the cache was searched"
        if online_error is None
        else f"the Hub could not provide it ({type(online_error).__name__}: "
        f"{str(online_error).splitlines()[0] if str(online_error) else ''})"
    )
    return (
        f"model {model_id!r} is not a local path, and Hub model {repo_id!r} (revision {rev!r}) "
        f"is not in the Hugging Face cache {str(cache)!r}; {where}. Download it on a machine "
        f"with network access with `hf {how}` (`huggingface-cli {how}` with older "
        "huggingface_hub versions), into the same cache (HF_HUB_CACHE or HF_HOME), or give "
        "a local folder or .gguf file"
    )
