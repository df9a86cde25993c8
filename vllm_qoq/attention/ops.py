"""The KV4 torch ops: `qoq::kv4_cache_write`, `qoq::kv4_attention`, `qoq::kv4_gather_dequant`.

Schemas live here, in Python, next to vllm_qoq/ops.py's (same `qoq`
namespace, through a FRAGMENT library).  Implementations:
  * CPU: the reference (vllm_qoq/reference/kv4.py), always;
  * CUDA: the kernels of csrc/attention/ (TORCH_LIBRARY_IMPL(qoq, CUDA) in
    csrc/attention/bindings.cpp, inside the vllm_qoq._C extension) when that
    extension was built with them, otherwise the reference as well (also with
    VLLM_QOQ_DISABLE_KERNELS=1; the reference syncs with the host, so the
    backend then declares no CUDA-graph support);
  * fake: the ops only mutate arguments (the cache, out, k_out/v_out), so the fake
    is a no-op and Dynamo (fullgraph) can trace the backend.

`kv4_gather_dequant` writes the dequantized K/V of whole sequences into a dense
workspace: the prefill path of the backend (gather, then FlashAttention varlen).
"""

from __future__ import annotations

import logging
import os

import torch

from ..reference import kv4 as ref

logger = logging.getLogger(__name__)

_SCHEMAS = {
    "kv4_cache_write": (
        "kv4_cache_write(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping) -> ()"
    ),
    "kv4_attention": (
        "kv4_attention(Tensor(a!) out, Tensor query, Tensor kv_cache, Tensor block_table, "
        "Tensor seq_lens, Tensor query_start_loc, int max_query_len, int max_seq_len, "
        "float scale, int num_splits) -> ()"
    ),
    "kv4_gather_dequant": (
        "kv4_gather_dequant(Tensor kv_cache, Tensor block_table, Tensor cu_seqlens_k, "
        "int max_seqlen_k, Tensor(a!) k_out, Tensor(b!) v_out) -> ()"
    ),
}
_REFERENCE = {"kv4_cache_write": ref.kv4_cache_write, "kv4_attention": ref.kv4_attention,
              "kv4_gather_dequant": ref.kv4_gather_dequant}

_state: dict = {"lib": None, "cuda": False}


def _fake_cache_write(key, value, kv_cache, slot_mapping):
    return None


def _fake_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc,
                    max_query_len, max_seq_len, scale, num_splits):
    return None


def _fake_gather_dequant(kv_cache, block_table, cu_seqlens_k, max_seqlen_k, k_out, v_out):
    return None


_FAKE = {"kv4_cache_write": _fake_cache_write, "kv4_attention": _fake_attention,
         "kv4_gather_dequant": _fake_gather_dequant}


def _has_cuda_kernel(name: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"qoq::{name}", "CUDA")
    except RuntimeError:
        return False


def register_ops() -> None:
    """Define the KV4 ops (idempotent; never touches CUDA)."""
    if _state["lib"] is not None:
        return
    if hasattr(torch.ops, "qoq") and hasattr(torch.ops.qoq, "kv4_gather_dequant"):
        _state["lib"] = "external"  # defined by another copy of this module
        _state["cuda"] = all(_has_cuda_kernel(n) for n in _SCHEMAS)
        return
    lib = torch.library.Library("qoq", "FRAGMENT")
    for name, schema in _SCHEMAS.items():
        lib.define(schema)
        lib.impl(name, _REFERENCE[name], "CPU")
        torch.library.register_fake(f"qoq::{name}", lib=lib)(_FAKE[name])
    if os.environ.get("VLLM_QOQ_DISABLE_KERNELS") != "1":  # as vllm_qoq/ops.py
        try:
            from .. import _C  # noqa: F401  (registers the CUDA kernels on import)
        except ImportError:
            pass
    cuda = all(_has_cuda_kernel(n) for n in _SCHEMAS)
    if not cuda:
        for name in _SCHEMAS:
            if not _has_cuda_kernel(name):
                lib.impl(name, _REFERENCE[name], "CUDA")
    _state["lib"] = lib
    _state["cuda"] = cuda


def has_cuda_kernels() -> bool:
    """True when the compiled KV4 kernels serve the CUDA dispatch key."""
    register_ops()
    return bool(_state["cuda"])


# Thin wrappers, in the style of vllm/_custom_ops.py.
def kv4_cache_write(key, value, kv_cache, slot_mapping) -> None:
    torch.ops.qoq.kv4_cache_write(key, value, kv_cache, slot_mapping)


def kv4_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc,
                  max_query_len: int, max_seq_len: int, scale: float, num_splits: int = 0) -> None:
    torch.ops.qoq.kv4_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc,
                                max_query_len, max_seq_len, scale, num_splits)


def kv4_gather_dequant(kv_cache, block_table, cu_seqlens_k, max_seqlen_k: int, k_out, v_out) -> None:
    # Host-side shape checks (no device sync) before the op, whose own TORCH_CHECKs repeat
    # them: an exception raised inside the compiled extension was seen to crash some
    # processes on the device toolchain (docs/kernels.md, known issues).
    if k_out.dim() != 3 or k_out.shape != v_out.shape:
        raise ValueError(f"kv4_gather_dequant: k_out/v_out must be equal [tokens, heads, head_dim], "
                         f"got {tuple(k_out.shape)} and {tuple(v_out.shape)}")
    heads, d = k_out.shape[1], k_out.shape[2]
    if kv_cache.dim() != 4 or kv_cache.shape[2] != heads:
        raise ValueError(f"kv4_gather_dequant: the outputs have {heads} KV heads, the cache "
                         f"{tuple(kv_cache.shape)} has {kv_cache.shape[2] if kv_cache.dim() == 4 else '?'}")
    block_size = kv_cache.shape[3] // (d // 2 + 4)
    if max_seqlen_k > block_table.shape[-1] * block_size:
        raise ValueError(f"kv4_gather_dequant: max_seqlen_k={max_seqlen_k} exceeds the block table "
                         f"({block_table.shape[-1]} blocks of {block_size} tokens)")
    torch.ops.qoq.kv4_gather_dequant(kv_cache, block_table, cu_seqlens_k, max_seqlen_k, k_out, v_out)
