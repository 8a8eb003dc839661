"""prefixflow on Ray: data-parallel replicas routed by prefix, and a Ray Data processor.

Ray is an optional extra (`pip install prefixflow[ray]`); nothing here is imported unless
it is used.
"""

from __future__ import annotations


def build_processor(*args, **kwargs):
    """See prefixflow.ray.data.build_processor."""
    from prefixflow.ray.data import build_processor as build

    return build(*args, **kwargs)
