"""The KV4 backend's vLLM glue on CPU: registration, page budget, auto-selection, guard."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

import vllm_qoq  # noqa: E402
from vllm_qoq import compat  # noqa: E402
from vllm_qoq.attention import BACKEND_PATH, auto_select_kv4, get_attention_quant_method  # noqa: E402
from vllm_qoq.attention.backend import QoQKV4AttentionBackend  # noqa: E402

vllm_qoq.register()


def test_registered_in_the_custom_slot_idempotently():
    vllm_qoq.register()
    from vllm_qoq.attention import register_backend

    register_backend()
    assert compat.custom_backend_path() == BACKEND_PATH
    assert compat.AttentionBackendEnum.CUSTOM.get_class() is QoQKV4AttentionBackend
    assert compat.AttentionBackendEnum[QoQKV4AttentionBackend.get_name()] is compat.AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize("d,bs,h", [(64, 16, 2), (128, 16, 8), (128, 128, 1)])
def test_page_size_vllm_budgets_equals_our_cache_shape(d, bs, h):
    from vllm.v1.kv_cache_interface import FullAttentionSpec, get_kv_quant_mode
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    spec = FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d,
                             dtype=STR_DTYPE_TO_TORCH_DTYPE[compat.KV4_CACHE_DTYPE],
                             kv_quant_mode=get_kv_quant_mode(compat.KV4_CACHE_DTYPE))
    spec = QoQKV4AttentionBackend.customize_spec(spec)
    shape = QoQKV4AttentionBackend.get_kv_cache_shape(7, bs, h, d, compat.KV4_CACHE_DTYPE)
    assert shape[0] == 7
    assert spec.page_size_bytes == math.prod(shape[1:])  # 1 byte per element (uint8)
    assert spec.page_size_bytes == bs * h * 2 * (d // 2 + 4)
    if not compat.backend_shapes_the_cache():  # 0.32+: vLLM's [B, H, N, C] view of the spec
        from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes

        view = torch.zeros(compute_layer_kv_cache_shape_bytes(spec, 7), dtype=torch.uint8)
        assert compat.kv4_pages(view, h, d).shape == shape


def test_backend_declares_what_it_supports():
    b = QoQKV4AttentionBackend
    assert b.supports_kv_cache_dtype(compat.KV4_CACHE_DTYPE)
    assert not b.supports_kv_cache_dtype("fp8")
    assert not b.supports_kv_cache_dtype("auto")
    assert b.supports_block_size(16) and b.supports_block_size(128) and not b.supports_block_size(8)
    assert b.forward_includes_kv_cache_update is False
    if compat.backend_shapes_the_cache():  # 0.26/0.28
        assert b.get_kv_cache_block_dim(16, 2, 64, compat.KV4_CACHE_DTYPE) == 0
    else:  # 0.32+: the layout whose blocks kv4_pages re-reads
        assert [x.name for x in b.supported_kv_cache_layouts()] == ["LBHNC"]


def _config(bits=4, name="qoq", dtype="auto", backend=None):
    quant = SimpleNamespace(kv_cache_bits=bits, get_name=lambda: name)
    return SimpleNamespace(quant_config=quant, cache_config=SimpleNamespace(cache_dtype=dtype),
                           attention_config=SimpleNamespace(backend=backend))


def test_auto_selection_for_qoq_kv4_checkpoints_only():
    custom = compat.AttentionBackendEnum.CUSTOM
    c = _config()
    auto_select_kv4(c)
    assert c.cache_config.cache_dtype == compat.KV4_CACHE_DTYPE and c.attention_config.backend is custom
    for c in (_config(bits=16), _config(name="awq"), _config(dtype="fp8")):
        before = (c.cache_config.cache_dtype, c.attention_config.backend)
        auto_select_kv4(c)
        assert (c.cache_config.cache_dtype, c.attention_config.backend) == before
    c = _config(backend=compat.AttentionBackendEnum.FLASH_ATTN)  # explicit other backend: keep auto
    auto_select_kv4(c)
    assert c.cache_config.cache_dtype == "auto"
    with pytest.raises(ValueError, match="CUSTOM"):
        auto_select_kv4(_config(dtype=compat.KV4_CACHE_DTYPE, backend=compat.AttentionBackendEnum.TRITON_ATTN))


def test_platform_hook_is_installed_once():
    pcls, platform = compat.current_platform_class()
    assert getattr(pcls.check_and_update_config, "_qoq_kv4", False)
    if platform.is_cpu():
        from vllm.v1.attention.selector import AttentionSelectorConfig

        cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float16,
                                      kv_cache_dtype=compat.KV4_CACHE_DTYPE, block_size=None)
        assert pcls.get_attn_backend_cls(compat.AttentionBackendEnum.CUSTOM, cfg) == BACKEND_PATH
        assert pcls.get_attn_backend_cls(None, cfg) != BACKEND_PATH  # CPU_ATTN as before
        bad = cfg._replace(head_size=63)
        with pytest.raises(ValueError, match="head_size"):
            pcls.get_attn_backend_cls(compat.AttentionBackendEnum.CUSTOM, bad)


class _Triton:  # stands in for vLLM's TritonAttentionBackend
    pass


def test_guard_refuses_kv4_checkpoint_on_another_int4_backend():
    quant = SimpleNamespace(kv_cache_bits=4)
    ours = SimpleNamespace(kv_cache_dtype=compat.KV4_CACHE_DTYPE, attn_backend=QoQKV4AttentionBackend)
    assert get_attention_quant_method(quant, ours, "model.layers.0.self_attn.attn") is None
    theirs = SimpleNamespace(kv_cache_dtype=compat.KV4_CACHE_DTYPE, attn_backend=_Triton)
    with pytest.raises(ValueError, match="layers.3.*CUSTOM"):
        get_attention_quant_method(quant, theirs, "model.layers.3.self_attn.attn")
    # the user chose another cache dtype: allowed (no int4 format confusion)
    other = SimpleNamespace(kv_cache_dtype="fp8", attn_backend=_Triton)
    assert get_attention_quant_method(quant, other, "x") is None
    # a non-KV4 qoq checkpoint may use Triton's int4 on request
    assert get_attention_quant_method(SimpleNamespace(kv_cache_bits=16), theirs, "x") is None


def test_impl_rejects_what_the_kernels_do_not_do():
    from vllm_qoq.attention.backend import QoQKV4AttentionImpl

    with pytest.raises(NotImplementedError, match="sliding window"):
        QoQKV4AttentionImpl(4, 64, 0.125, 2, sliding_window=128, kv_cache_dtype=compat.KV4_CACHE_DTYPE)
    with pytest.raises(ValueError, match="int4_per_token_head"):
        QoQKV4AttentionImpl(4, 64, 0.125, 2, kv_cache_dtype="auto")
