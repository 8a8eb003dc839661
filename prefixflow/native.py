"""prefixflow's C++ kernels (prefixflow/csrc/): whether they can run here.

The kernels (paged attention, the fused elementwise operations of a layer, the heavy pass
of sampling, registered as torch.ops.prefixflow.*) ship as C++ sources inside the package.
The first process that asks for them compiles them for this CPU's vector instructions
with torch.utils.cpp_extension, into ~/.cache/prefixflow/kernels/<key> (prefixflow/
kernel_build.py; PREFIXFLOW_CACHE_DIR moves it); every later process loads them from there
in milliseconds. `make setup` does that first build, so neither the example nor the tests
wait for it. However prefixflow was installed, it is the same.

Where they cannot run (no compiler, a failed build, PREFIXFLOW_NO_EXTENSION=1, a CPU that
lacks an instruction they were built for), `available()` is False and says why in one
line; every user then takes its PyTorch path, which gives the same results more slowly.
`prefixflow env` shows the state.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefixflow import kernel_build
from prefixflow.utils.hardware import cpu_flags

logger = logging.getLogger("prefixflow")


@dataclass(frozen=True)
class KernelState:
    """How this process came by its kernels, or why it has none."""

    # "built" (compiled by this process), "cached" (loaded from the cache), "failed"
    # (no compiler, a failed build, a CPU without the instructions) or "disabled".
    status: str
    reason: str  # one line: why, and where they are off, what to do
    folder: Path | None  # the cache folder, where there is one
    seconds: float  # what building or loading them took

    @property
    def available(self) -> bool:
        return self.status in ("built", "cached")


_state: KernelState | None = None


@functools.cache
def available() -> bool:
    """Whether torch.ops.prefixflow.* can run here; the first call builds or loads them."""
    global _state
    _state = _resolve()
    if _state.status == "failed":
        logger.warning("C++ kernels off: %s", _state.reason)
    elif _state.status == "disabled":
        logger.info("C++ kernels off: %s", _state.reason)
    return _state.available


def state() -> KernelState:
    """The kernels' state, building or loading them first where no one has asked yet."""
    available()
    assert _state is not None
    return _state


def _resolve() -> KernelState:
    if os.environ.get("PREFIXFLOW_NO_EXTENSION"):
        return KernelState(
            "disabled", "PREFIXFLOW_NO_EXTENSION is set; using PyTorch instead", None, 0.0
        )
    if kernel_build.MODULE in sys.modules:
        # Loaded earlier in this process (or blocked, as Python blocks an import whose
        # sys.modules entry is None): a second copy of the library must never be loaded.
        ext = sys.modules[kernel_build.MODULE]
        if ext is None:
            why = f"import of {kernel_build.MODULE} is blocked; using PyTorch instead"
            return KernelState("failed", why, None, 0.0)
        folder = Path(ext.__file__).parent if getattr(ext, "__file__", None) else None
        return _checked(ext, "cached", "loaded earlier in this process", folder, 0.0)
    start = time.perf_counter()
    folder = None
    try:
        folder = kernel_build.kernel_dir()
        ext, built = kernel_build.load_or_build(folder)
    except kernel_build.BuildFailed as e:
        seen = " (remembered from an earlier try)" if e.remembered else ""
        return KernelState(
            "failed",
            f"{e.why}{seen}; using PyTorch instead, which is slower. To get them: {e.todo}",
            folder,
            time.perf_counter() - start,
        )
    except OSError as e:  # the cache folder unwritable, a disk full
        why = f"the kernel cache {folder} cannot be used ({e}); using PyTorch instead"
        todo = "set PREFIXFLOW_CACHE_DIR to a writable folder"
        return KernelState("failed", f"{why}. To get them: {todo}", folder, 0.0)
    except Exception as e:  # noqa: BLE001 - whatever broke, the PyTorch path runs
        why = f"loading them failed ({type(e).__name__}: {e}); using PyTorch instead"
        return KernelState("failed", f"{why}. To retry: delete {folder}", folder, 0.0)
    seconds = time.perf_counter() - start
    how = (
        f"compiled in {seconds:.1f} s"
        if built
        else f"loaded from the cache in {seconds * 1e3:.0f} ms"
    )
    return _checked(ext, "built" if built else "cached", how, folder, seconds)


def _checked(ext, status: str, how: str, folder: Path | None, seconds: float) -> KernelState:
    missing = [f for f in ext.compiled_isa().split() if f not in cpu_flags()]
    if missing:
        return KernelState(
            "failed",
            f"they were built for a CPU with {', '.join(missing)}, which this one lacks; "
            f"using PyTorch instead (delete {folder} to rebuild them here)",
            folder,
            seconds,
        )
    return KernelState(status, how, folder, seconds)
