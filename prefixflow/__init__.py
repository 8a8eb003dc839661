"""prefixflow: throughput-first batch LLM inference with global prefix sharing."""

from prefixflow.llm import LLM
from prefixflow.request import CompletionOutput, Logprob, RequestOutput
from prefixflow.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"
