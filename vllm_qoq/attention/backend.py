"""vLLM attention backend for the KV4 cache (the CUSTOM slot of the registry).

Selected with `--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM`
for any model, and automatically for qoq checkpoints with kv_cache_bits == 4
(vllm_qoq/attention/__init__.py).  The page layout and the math are those of
vllm_qoq/reference/kv4.py; the work is done by two torch ops
(vllm_qoq/attention/ops.py): `kv4_cache_write` (called by vLLM through
do_kv_cache_update, before attention) and `kv4_attention`, one op for decode,
prefill, chunked prefill and prefix-cached prefill: every query token attends
causally to the KV4 pages of its sequence.  On CUDA the op picks the split-KV
decode launch or the prefill launch from max_query_len; on CPU it runs the
reference, so CPU CI exercises this whole class.

CUDA graphs: uniform single-token decode batches.  The launch shape depends only
on host values fixed at capture (batch size, max_query_len == 1, and the
max_seq_len that build_for_cudagraph_capture raises to max_model_len); the
kernels read the real lengths from the persistent seq_lens / block_table
buffers at replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .. import compat
from ..reference import kv4 as ref
from . import ops

# Head sizes the CUDA kernels are compiled for (csrc/attention/kv4_attention.cu).
CUDA_HEAD_SIZES = (64, 128)
BLOCK_MULTIPLE = 16  # a 16-token tile of the kernels never straddles a page


def _on_cuda() -> bool:
    _, platform = compat.current_platform_class()
    return platform.is_cuda_alike()


class QoQKV4AttentionBackend(compat.AttentionBackend):
    """4-bit per-token-head KV cache (vllm_qoq layout) with paged CUDA kernels."""

    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = [compat.KV4_CACHE_DTYPE]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # must equal the registry member it is registered under

    @staticmethod
    def get_impl_cls():
        return QoQKV4AttentionImpl

    @staticmethod
    def get_builder_cls():
        return QoQKV4MetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(*args) -> list:  # 0.33 passes a spec
        return [compat.MultipleOf(BLOCK_MULTIPLE)]

    @staticmethod
    def get_kv_cache_shape(
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        cache_dtype_str: str = compat.KV4_CACHE_DTYPE,
    ) -> tuple[int, ...]:
        # Always the KV4 layout: vLLM also calls this to probe where the block dim is.
        # A layer that is not int4_per_token_head never reaches the impl (its
        # __init__ refuses other cache dtypes).
        return ref.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def customize_spec(cls, spec):
        """Page content per (token, KV head): K and V, each D/2 code bytes + fp16 scale + zero."""
        mode = getattr(spec, "kv_quant_mode", None)
        if mode is None or mode.name != "INT4_PER_TOKEN_HEAD":
            return spec
        return compat.with_page_content(spec, spec.head_size + 2 * ref.SZ_BYTES)

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        if _on_cuda():
            return head_size in CUDA_HEAD_SIZES
        return head_size > 0 and head_size % 2 == 0

    @classmethod
    def supports_dtype(cls, dtype: torch.dtype) -> bool:
        if _on_cuda():
            return dtype in (torch.float16, torch.bfloat16)
        return dtype in cls.supported_dtypes

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype in (None, compat.KV4_CACHE_DTYPE)

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is None or capability.major >= 8

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == compat.AttentionType.DECODER


@dataclass
class QoQKV4Metadata(compat.AttentionMetadata):
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, cached tokens incl. this step's
    block_table: torch.Tensor  # [B, max_blocks] int32
    slot_mapping: torch.Tensor  # [num_actual_tokens] int64


class QoQKV4MetadataBuilder(compat.AttentionMetadataBuilder[QoQKV4Metadata]):
    _cudagraph_support: ClassVar = compat.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = None  # the kernel takes mixed batches as they come

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._max_model_len = compat.max_model_len(vllm_config)

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec):
        if _on_cuda() and not ops.has_cuda_kernels():
            return compat.AttentionCGSupport.NEVER  # the reference syncs with the host
        return cls._cudagraph_support

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        cam = common_attn_metadata
        return QoQKV4Metadata(
            num_actual_tokens=cam.num_actual_tokens,
            max_query_len=int(cam.max_query_len),
            max_seq_len=int(cam.max_seq_len),
            query_start_loc=cam.query_start_loc,
            seq_lens=cam.seq_lens,
            block_table=cam.block_table_tensor,
            slot_mapping=cam.slot_mapping,
        )

    def build_for_cudagraph_capture(self, common_attn_metadata):
        md = self.build(0, common_attn_metadata)
        # The captured launch (split-KV count) must serve every later replay.
        md.max_seq_len = max(md.max_seq_len, self._max_model_len)
        return md


class QoQKV4AttentionImpl(compat.AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = compat.KV4_CACHE_DTYPE,
        logits_soft_cap: float | None = None,
        attn_type: str = compat.AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **kwargs,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "sliding window": sliding_window is not None,
            "logits soft cap": bool(logits_soft_cap),
            "attention sinks": kwargs.get("sinks") is not None,
            f"attention type {attn_type}": attn_type != compat.AttentionType.DECODER,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise NotImplementedError(
                f"the qoq KV4 attention backend does not support {', '.join(bad)}; "
                "serve this model without the KV4 cache (--kv-cache-dtype auto)"
            )
        if kv_cache_dtype != compat.KV4_CACHE_DTYPE:
            raise ValueError(
                f"the qoq KV4 backend needs kv_cache_dtype={compat.KV4_CACHE_DTYPE!r}, "
                f"got {kv_cache_dtype!r}"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.attn_type = attn_type
        ops.register_ops()

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.kv_sharing_target_layer_name is not None:
            return  # this layer reads another layer's cache
        n = slot_mapping.shape[0]
        if n == 0:
            return
        ops.kv4_cache_write(key[:n], value[:n], kv_cache, slot_mapping)

    def forward(
        self,
        layer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: QoQKV4Metadata,
        output: torch.Tensor | None = None,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the qoq KV4 backend does not fuse output quantization")
        assert output is not None, "the qoq KV4 backend writes into vLLM's output buffer"
        if attn_metadata is None:  # profiling run: the cache is not allocated yet
            return output.fill_(0)
        n = attn_metadata.num_actual_tokens
        if n == 0:
            return output
        q = query[:n].view(n, self.num_heads, self.head_size)
        out = output[:n].view(n, self.num_heads, self.head_size)
        ops.kv4_attention(
            out,
            q,
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            attn_metadata.max_query_len,
            attn_metadata.max_seq_len,
            self.scale,
            0,
        )
        return output
