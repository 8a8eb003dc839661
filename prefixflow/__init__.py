"""prefixflow: throughput-first batch LLM inference with global prefix sharing."""

from prefixflow.lora.request import LoRARequest
from prefixflow.request import CompletionOutput, Logprob, RequestOutput
from prefixflow.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "LoRARequest",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch; loading it lazily keeps the scheduler's pure-Python imports light.
    if name == "LLM":
        from prefixflow.llm import LLM

        return LLM
    raise AttributeError(f"module 'prefixflow' has no attribute {name!r}")
