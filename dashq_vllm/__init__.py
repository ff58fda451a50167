"""dashq-vllm: DASH-Q 2/3/4-bit weights, quantized offline and served by vLLM.

Importing this package is cheap and never imports vLLM: the vLLM method lives in
``dashq_vllm.plugin`` and is loaded by vLLM through the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
