"""Compiles prefixflow's C++ kernels (prefixflow/csrc/) on first use, into a cache folder.

The sources ship inside the package, so every way of installing prefixflow (a wheel, `pip
install .` with build isolation, `pip install git+URL`, an editable checkout) gets them, and
torch.utils.cpp_extension compiles them against the torch that is running, which an
isolated build environment could not. The folder, `<cache>/kernels/<key>`, is named by a
hash of all that goes into the build (the sources, torch's version, Python's ABI, the flags
for this CPU's vector instructions), so every install of the same sources on a machine
shares one build, and a new torch or a new CPU gets a new one. The sources are copied
into the folder first: ninja then sees the same paths whatever the install location.

A failed build is remembered in its folder (failed.json) with the toolchain that failed, so
later processes skip it at no cost until the compiler or ninja changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shlex
import shutil
import sys
import sysconfig
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from prefixflow.utils.cache_dir import cache_root
from prefixflow.utils.hardware import cpu_flags

logger = logging.getLogger("prefixflow")

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = (
    "module.cpp",
    "paged_attention.cpp",
    "fused_ops.cpp",
    "sampling.cpp",
    "int8_gemm.cpp",
    "block_gemm.cpp",
)
MODULE = "prefixflow._C"
LINK_ARGS = ("-fopenmp",)
# A build that is still going after this long says so, once; a failing one is usually
# done sooner and so prints only its failure.
NOTICE_AFTER_S = 3.0


class BuildFailed(Exception):
    """The kernels could not be built: `why` in a few words, `todo` what the user can do."""

    def __init__(self, why: str, todo: str, remembered: bool = False) -> None:
        super().__init__(why)
        self.why, self.todo, self.remembered = why, todo, remembered


def isa_args(flags: frozenset[str]) -> list[str]:
    """Compiler flags for the vector instructions of a CPU with these /proc/cpuinfo flags."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        avx512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"]
        avx512 += ["-mavx512vnni"] if "avx512_vnni" in flags else []  # int8_gemm.cpp
        return avx512 + (["-mavx512bf16"] if "avx512_bf16" in flags else [])
    if {"avx2", "fma"} <= flags:
        return ["-mavx2", "-mfma"]
    return []


def compile_args() -> list[str]:
    # no contraction of a * b + c into one rounding: the kernels round where PyTorch does
    return ["-O3", "-DNDEBUG", "-fopenmp", "-ffp-contract=off", *isa_args(cpu_flags())]


def _source_files() -> list[Path]:
    try:
        files = sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h"))
    except OSError:
        files = []
    if not {f.name for f in files} >= set(SOURCES):
        raise BuildFailed(
            f"their C++ sources are not installed ({SOURCE_DIR} lacks them)",
            "reinstall prefixflow from a release or a full checkout",
        )
    return files


def build_key() -> str:
    h = hashlib.sha256()
    for f in _source_files():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for part in (
        torch.__version__,
        torch.version.git_version,
        sysconfig.get_config_var("EXT_SUFFIX") or sys.implementation.cache_tag,
        sys.platform,
        *compile_args(),
        "|",
        *LINK_ARGS,
    ):
        h.update(str(part).encode() + b"\0")
    return h.hexdigest()[:16]


def kernel_dir() -> Path:
    return cache_root() / "kernels" / build_key()


def load_or_build(folder: Path) -> tuple[ModuleType, bool]:
    """The kernels' module from `folder`, compiled there first where needed; and whether it was.

    Raises BuildFailed, with one line on why and what to do.
    """
    module = _load_ready(folder)
    if module is not None:
        return module, False
    _raise_remembered_failure(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildFailed(
            f"cannot create the kernel cache {folder} ({e.strerror})",
            "set PREFIXFLOW_CACHE_DIR to a writable folder",
        ) from e
    with _notice_if_slow(folder), _locked(folder / ".lock"):
        # Another process may have built it, or failed, while this one waited.
        module = _load_ready(folder)
        if module is not None:
            return module, False
        _raise_remembered_failure(folder)
        return _build(folder), True


def _load_ready(folder: Path) -> ModuleType | None:
    try:
        library = folder / (folder / "ready").read_text().strip()
    except OSError:
        return None
    try:
        return _import(library)
    except ImportError:
        # Removed or damaged since: build it again.
        (folder / "ready").unlink(missing_ok=True)
        return None


def _import(library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a Python extension")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return module


def _build(folder: Path) -> ModuleType:
    compiler = _which(_compiler())
    if compiler is None:
        raise _remember(
            folder,
            BuildFailed(
                f"no C++ compiler ({_compiler()!r} is not on PATH)",
                "install one (Debian/Ubuntu: apt-get install g++) or point CXX at one",
            ),
        )
    if _which("ninja") is None:
        raise _remember(
            folder, BuildFailed("ninja is not installed", "pip install ninja in this environment")
        )
    src, build = folder / "src", folder / "build"
    src.mkdir(exist_ok=True)
    build.mkdir(exist_ok=True)
    for f in _source_files():
        dest = src / f.name
        # Rewriting an identical file would make ninja recompile a half-finished build.
        if not dest.exists() or dest.read_bytes() != f.read_bytes():
            shutil.copyfile(f, dest)
    # torch's own lock file, left by a build that was killed; this process holds the folder.
    (build / "lock").unlink(missing_ok=True)
    captured: list[str] = []
    try:
        with _tools_on_path(), _torch_logs_into(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.utils import cpp_extension

            module = cpp_extension.load(
                name="_C",
                sources=[str(src / s) for s in SOURCES],
                extra_cflags=compile_args(),
                extra_ldflags=list(LINK_ARGS),
                build_directory=str(build),
                verbose=False,
            )
    except Exception as e:  # noqa: BLE001 - whatever broke, the PyTorch path runs
        log = folder / "build.log"
        with contextlib.suppress(OSError):
            log.write_text("\n".join([*captured, f"{type(e).__name__}: {e}"]) + "\n")
        raise _remember(
            folder,
            BuildFailed(
                f"compiling them with {compiler} failed ({_first_error(str(e))})",
                f"the compiler's output is in {log}",
            ),
        ) from e
    sys.modules[MODULE] = module
    library = Path(module.__file__)
    tmp = folder / "ready.tmp"
    tmp.write_text(str(library.relative_to(folder)) + "\n")
    os.replace(tmp, folder / "ready")
    (folder / "failed.json").unlink(missing_ok=True)
    return module


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _which(program: str) -> str | None:
    words = shlex.split(program) or [program]
    with _tools_on_path():
        return shutil.which(words[0])


def _toolchain() -> str:
    """What a build depends on outside the sources: a new compiler or ninja is worth a retry."""
    parts = []
    for program in (_compiler(), "ninja"):
        path = _which(program)
        try:
            parts.append(f"{path}@{os.stat(path).st_mtime_ns}" if path else f"{program}:missing")
        except OSError:
            parts.append(f"{path}:unreadable")
    return " ".join(parts)


def _remember(folder: Path, failure: BuildFailed) -> BuildFailed:
    record = {"toolchain": _toolchain(), "why": failure.why, "todo": failure.todo}
    with contextlib.suppress(OSError):
        (folder / "failed.json").write_text(json.dumps(record) + "\n")
    return failure


def _raise_remembered_failure(folder: Path) -> None:
    try:
        record = json.loads((folder / "failed.json").read_text())
    except (OSError, ValueError):
        return
    if record.get("toolchain") != _toolchain():
        return
    raise BuildFailed(
        record.get("why", "an earlier build failed"),
        f"{record.get('todo', '')}; then delete {folder / 'failed.json'} to try again",
        remembered=True,
    )


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.startswith("Error building extension"):
            return ln[:200]
    return (lines[0] if lines else "no output")[:200]


@contextlib.contextmanager
def _tools_on_path() -> Iterator[None]:
    """The `ninja` package's program on PATH (torch calls plain `ninja`), even where this
    environment's bin/ is not on PATH (.venv/bin/python run without activating)."""
    extra = [os.path.dirname(sys.executable), sysconfig.get_path("scripts")]
    try:
        import ninja

        extra.insert(0, ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    old = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join([*[d for d in extra if d], old or os.defpath])
    try:
        yield
    finally:
        if old is None:
            del os.environ["PATH"]
        else:
            os.environ["PATH"] = old


@contextlib.contextmanager
def _torch_logs_into(lines: list[str]) -> Iterator[None]:
    """cpp_extension's warnings (a compiler it does not know, say) go to the build log, not
    the terminal: the one line prefixflow prints says what matters."""

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    handler, propagate = Keep(), torch_logger.propagate
    torch_logger.addHandler(handler)
    torch_logger.propagate = False
    try:
        yield
    finally:
        torch_logger.removeHandler(handler)
        torch_logger.propagate = propagate


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per folder at a time, across processes; the lock goes with its process,
    so a killed build leaves nothing to clean up."""
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as torch's own JIT builds there
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _notice_if_slow(folder: Path) -> Iterator[None]:
    timer = threading.Timer(
        NOTICE_AFTER_S,
        logger.warning,
        (
            "compiling the C++ kernels for this machine, once (about half a minute); "
            "they are kept in %s",
            folder,
        ),
    )
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
