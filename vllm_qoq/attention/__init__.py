"""The KV4 attention backend: registration, automatic selection, and its guard.

`register_backend()` (called from vllm_qoq.register() in every vLLM process;
idempotent, never touches CUDA, works on CPU-only vLLM):
  * defines the KV4 torch ops (vllm_qoq/attention/ops.py);
  * registers QoQKV4AttentionBackend in vLLM's CUSTOM backend slot, so
    `--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM` gives any
    model (bf16, FP8, qoq) our KV4 cache;
  * wraps the current platform's check_and_update_config: for a qoq checkpoint
    with kv_cache_bits == 4 it sets kv_cache_dtype int4_per_token_head and the
    CUSTOM backend when the user left them unset (`vllm serve M` needs no flags).
    That hook runs inside VllmConfig.__post_init__ after the quantization config
    is parsed and before anything reads the cache dtype, in the process that
    builds the config; workers receive the updated config;
  * on the CPU platform, which otherwise always returns its own backend, makes
    the CUSTOM request select ours (its impl runs the reference ops), so CPU CI
    covers the integration.

`get_attention_quant_method()` is what QoQConfig.get_quant_method returns for
vLLM's Attention layers: None (no KV-cache method: a kv_cache_scheme would make
vLLM force fp8), after checking that a qoq KV4 checkpoint whose layer got the
int4_per_token_head cache really runs on our backend (vLLM's Triton backend has
its own, different int4_per_token_head format and would run silently).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

BACKEND_PATH = "vllm_qoq.attention.backend.QoQKV4AttentionBackend"
_state = {"registered": False}


def register_backend() -> None:
    """Register the KV4 ops and backend, and the automatic selection (idempotent)."""
    if _state["registered"]:
        return
    from .. import compat
    from . import ops

    ops.register_ops()
    previous = compat.custom_backend_path()
    if previous not in (None, BACKEND_PATH):
        logger.warning("vllm_qoq: replacing %s in vLLM's CUSTOM attention backend slot", previous)
    compat.register_attention_backend(compat.AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _patch_platform()
    _state["registered"] = True


def _is_ours_custom(compat) -> bool:
    return compat.custom_backend_path() == BACKEND_PATH


def auto_select_kv4(vllm_config) -> None:
    """For a qoq kv_cache_bits == 4 checkpoint, pick the KV4 cache and our backend."""
    from .. import compat

    quant = getattr(vllm_config, "quant_config", None)
    if quant is None or getattr(quant, "kv_cache_bits", None) != 4:
        return
    if quant.get_name() != "qoq":
        return
    cache = vllm_config.cache_config
    attn = vllm_config.attention_config
    custom = compat.AttentionBackendEnum.CUSTOM
    if attn.backend not in (None, custom):
        if cache.cache_dtype == compat.KV4_CACHE_DTYPE:
            raise ValueError(
                f"qoq: this checkpoint is calibrated for vllm_qoq's KV4 cache, but "
                f"--attention-backend {attn.backend.name} would store "
                f"{compat.KV4_CACHE_DTYPE} in its own, different format; use "
                "--attention-backend CUSTOM (or leave it unset)"
            )
        logger.warning(
            "qoq: the checkpoint asks for a 4-bit KV cache, but --attention-backend %s was "
            "given: serving with kv_cache_dtype=%s instead",
            attn.backend.name,
            cache.cache_dtype,
        )
        return
    if cache.cache_dtype == "auto":
        cache.cache_dtype = compat.KV4_CACHE_DTYPE
        logger.info("qoq: kv_cache_bits=4 checkpoint: kv_cache_dtype=%s", cache.cache_dtype)
    if cache.cache_dtype != compat.KV4_CACHE_DTYPE:
        logger.warning(
            "qoq: the checkpoint asks for a 4-bit KV cache; serving with the requested "
            "kv_cache_dtype=%s instead",
            cache.cache_dtype,
        )
        return
    if attn.backend is None:
        attn.backend = custom
        logger.info("qoq: KV4 cache: attention backend CUSTOM (vllm_qoq KV4 kernels)")


def _patch_platform() -> None:
    from .. import compat

    pcls, platform = compat.current_platform_class()
    current = pcls.check_and_update_config
    if not getattr(current, "_qoq_kv4", False):
        original = current.__func__

        def check_and_update_config(cls, vllm_config):
            auto_select_kv4(vllm_config)
            return original(cls, vllm_config)

        check_and_update_config._qoq_kv4 = True
        pcls.check_and_update_config = classmethod(check_and_update_config)

    if platform.is_cpu():
        current = pcls.get_attn_backend_cls
        if not getattr(current, "_qoq_kv4", False):
            original_get = current.__func__

            def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kw):
                if (
                    selected_backend == compat.AttentionBackendEnum.CUSTOM
                    and _is_ours_custom(compat)
                    and not attn_selector_config.use_mla
                ):
                    from .backend import QoQKV4AttentionBackend

                    reasons = QoQKV4AttentionBackend.validate_configuration(
                        device_capability=None, **attn_selector_config._asdict()
                    )
                    if reasons:
                        raise ValueError(
                            f"vllm_qoq KV4 backend (CUSTOM) is not valid on CPU for "
                            f"{attn_selector_config}: {reasons}"
                        )
                    return BACKEND_PATH
                return original_get(cls, selected_backend, attn_selector_config, *args, **kw)

            get_attn_backend_cls._qoq_kv4 = True
            pcls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def get_attention_quant_method(quant_config, layer, prefix: str):
    """QoQConfig.get_quant_method for vLLM's Attention layers: the KV4 guard, then None."""
    from .. import compat

    kv_dtype = getattr(layer, "kv_cache_dtype", None)
    if getattr(quant_config, "kv_cache_bits", 16) == 4 and kv_dtype == compat.KV4_CACHE_DTYPE:
        backend = getattr(layer, "attn_backend", None)
        path = None if backend is None else f"{backend.__module__}.{backend.__qualname__}"
        if path != BACKEND_PATH:
            raise ValueError(
                f"qoq: {prefix}: kv_cache_dtype {compat.KV4_CACHE_DTYPE} would run on "
                f"{getattr(backend, '__name__', backend)}, whose int4 format is not vllm_qoq's; "
                "use --attention-backend CUSTOM (vllm_qoq's KV4 backend) or another "
                "--kv-cache-dtype"
            )
    return None
