"""Klotski: run Mixture-of-Experts models larger than device memory at high throughput.

from klotski import LLM, SamplingParams
llm = LLM(model="path/to/checkpoint")
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
"""

from klotski.engine import LLM
from klotski.outputs import CompletionOutput, RequestOutput
from klotski.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
