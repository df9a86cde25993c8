"""vllm_qoq: QoQ (W4A8KV4) quantization for vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it once in
every process (API server, engine core, workers) before the model is built.  It
is idempotent and never touches CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the `qoq` quantization method, its torch ops and the KV4 backend."""
    global _registered
    if _registered:
        return
    from . import ops

    ops.register_ops()
    from . import config  # noqa: F401  (the decorator registers "qoq" with vLLM)
    from .attention import register_backend

    register_backend()  # KV4 ops + the CUSTOM attention backend (idempotent)

    _registered = True
