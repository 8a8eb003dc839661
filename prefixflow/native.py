"""prefixflow's C++ kernels (csrc/): whether they can run here.

`pip install` builds them (setup.py) for the vector instructions of the machine that
builds them: paged attention, the fused elementwise operations of a layer, and the heavy
pass of sampling, registered as torch.ops.prefixflow.*. Where they were not built (no
compiler, PREFIXFLOW_NO_EXTENSION=1) or this CPU lacks an instruction they were built for,
`available()` is False and says so in one line; every user then takes its PyTorch path,
which gives the same results.
"""

from __future__ import annotations

import functools
import importlib
import logging

from prefixflow.utils.hardware import cpu_flags

logger = logging.getLogger("prefixflow")


@functools.cache
def available() -> bool:
    try:
        ext = importlib.import_module("prefixflow._C")
    except ImportError as e:
        logger.warning("prefixflow: C++ kernels not built (%s); using PyTorch instead", e)
        return False
    missing = [f for f in ext.compiled_isa().split() if f not in cpu_flags()]
    if missing:
        logger.warning(
            "prefixflow: C++ kernels were built for a CPU with %s, which this one lacks; "
            "using PyTorch instead (reinstall to rebuild them here)",
            ", ".join(missing),
        )
        return False
    return True
