"""vLLM general plugin: registers the ``dashq`` quantization method.

vLLM calls :func:`register` in every process it starts (API server, engine core, workers)
through the ``vllm.general_plugins`` entry point declared in pyproject.toml::

    [project.entry-points."vllm.general_plugins"]
    dashq = "dashq_vllm.plugin:register"

so ``vllm serve CKPT --quantization dashq`` (and ``vllm.LLM(..., quantization="dashq")``) work
without any import in user code. Registration is idempotent; importing this module is cheap
(vLLM is imported only when :func:`register` runs).
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register ``dashq`` with vLLM (safe to call any number of times, in any process)."""
    global _registered
    if _registered:
        return
    # Importing the module runs @register_quantization_config("dashq") and
    # @register_weight_loader_v2_supported_method on the linear method.
    from dashq_vllm import vllm_method  # noqa: F401

    _registered = True
