"""compat's KV4 cache glue across vLLM versions (docs/versions.md).

vLLM 0.26/0.28 shape every layer's cache with the backend's get_kv_cache_shape
(our pages [blocks, 2, Hkv, block_size * (D/2 + 4)] directly).  0.32 and 0.33
hand the backend a [blocks, Hkv, block_size, D + 8] view of the page budget that
customize_spec declared, laid out by the KVCacheLayout the backends agreed on;
compat.kv4_pages re-reads each block as our page.  The 0.32+ path is exercised
here on whichever vLLM is installed by forcing compat.backend_shapes_the_cache()
to False: the tensors are built the way 0.32's create_kv_cache_views builds them
(a flat byte buffer viewed [B, H, N, C] with the layout's strides).
"""

from __future__ import annotations

import dataclasses
from enum import IntEnum
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm_qoq import compat  # noqa: E402
from vllm_qoq.attention.backend import QoQKV4AttentionBackend  # noqa: E402
from vllm_qoq.reference import kv4 as ref  # noqa: E402

NB, HKV, BS, D = 5, 2, 16, 64
C = D + 2 * ref.SZ_BYTES  # page content per (token, KV head): K and V


@pytest.fixture
def vllm_views(monkeypatch):
    """Take the 0.32+ branch of compat.kv4_pages whatever vLLM is installed."""
    monkeypatch.setattr(compat, "backend_shapes_the_cache", lambda: False)


def _lbhnc(raw: torch.Tensor, block_stride: int) -> torch.Tensor:
    """vLLM's per-layer view of `raw` in the LBHNC layout ([B, H, N, C], one layer)."""
    return torch.as_strided(raw, (NB, HKV, BS, C), (block_stride, BS * C, C, 1))


def _write_both(cache_view: torch.Tensor, seed: int = 0, fill: int = 0):
    """Write the same tokens through kv4_pages and into a natively shaped cache
    (filled with `fill`, as cache_view's buffer is)."""
    g = torch.Generator().manual_seed(seed)
    ntok = 40
    key = torch.randn(ntok, HKV, D, generator=g, dtype=torch.float32).half()
    value = torch.randn(ntok, HKV, D, generator=g, dtype=torch.float32).half()
    slots = torch.randperm(NB * BS, generator=g)[:ntok].to(torch.int64)
    slots[3] = -1  # a padding token: not written
    native = torch.full(ref.kv_cache_shape(NB, BS, HKV, D), fill, dtype=torch.uint8)
    ref.kv4_cache_write(key, value, native, slots)
    pages = compat.kv4_pages(cache_view, HKV, D)
    ref.kv4_cache_write(key, value, pages, slots)
    return pages, native


def test_dense_lbhnc_view_is_read_as_our_pages(vllm_views):
    page = HKV * BS * C
    raw = torch.zeros(NB * page, dtype=torch.uint8)
    view = _lbhnc(raw, page)
    pages, native = _write_both(view)
    assert pages.shape == ref.kv_cache_shape(NB, BS, HKV, D)
    assert pages.data_ptr() == raw.data_ptr()  # a view: writes land in vLLM's buffer
    assert torch.equal(raw.view(NB, -1), native.view(NB, -1))


def test_padded_pages_keep_the_block_stride_and_the_padding(vllm_views):
    page = HKV * BS * C
    padded = page + 96  # AttentionSpec.page_size_padded (hybrid models)
    raw = torch.full((NB * padded,), 0xAB, dtype=torch.uint8)
    pages, native = _write_both(_lbhnc(raw, padded), seed=1, fill=0xAB)
    assert pages.stride(0) == padded
    blocks = raw.view(NB, padded)
    assert torch.equal(blocks[:, :page], native.view(NB, -1))
    assert bool((blocks[:, page:] == 0xAB).all())


def test_attention_reads_the_same_through_the_view(vllm_views):
    raw = torch.zeros(NB * HKV * BS * C, dtype=torch.uint8)
    pages, native = _write_both(_lbhnc(raw, HKV * BS * C), seed=2)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2 * HKV, D, generator=g, dtype=torch.float32).half()
    block_table = torch.tensor([[4, 0, 2]], dtype=torch.int32)
    seq_lens = torch.tensor([40], dtype=torch.int32)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    outs = []
    for cache in (pages, native):
        out = torch.empty_like(q)
        ref.kv4_attention(out, q, cache, block_table, seq_lens, qsl, 3, 40, D**-0.5, 0)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_views_kv4_pages_cannot_read_are_refused(vllm_views):
    page = HKV * BS * C
    raw = torch.zeros(NB * page, dtype=torch.uint8)
    lbnhc = torch.as_strided(raw, (NB, HKV, BS, C), (page, C, HKV * C, 1))  # token-major interior
    with pytest.raises(ValueError, match="LBHNC"):
        compat.kv4_pages(lbnhc, HKV, D)
    with pytest.raises(ValueError, match="blocks, 4, block_size"):
        compat.kv4_pages(_lbhnc(raw, page), 4, D)


def test_our_pages_and_unallocated_caches_pass_through(vllm_views):
    ours = torch.zeros(ref.kv_cache_shape(NB, BS, HKV, D), dtype=torch.uint8)
    assert compat.kv4_pages(ours, HKV, D) is ours
    empty = torch.empty(0, dtype=torch.uint8)
    assert compat.kv4_pages(empty, HKV, D) is empty


def test_get_kv_cache_shape_versions_return_their_tensor_untouched():
    if not compat.backend_shapes_the_cache():
        pytest.skip("this vLLM has no get_kv_cache_shape (0.32+)")
    view = torch.zeros(NB, HKV, BS, C, dtype=torch.uint8)  # would be re-read on 0.32+
    assert compat.kv4_pages(view, HKV, D) is view


def test_the_backend_asks_for_the_layout_kv4_pages_reads():
    layouts = QoQKV4AttentionBackend.supported_kv_cache_layouts()
    assert layouts == compat.kv4_cache_layouts()
    try:
        import vllm.v1.kv_cache_layout  # noqa: F401  (0.32+)
    except ImportError:
        assert layouts is None
        assert compat.backend_shapes_the_cache()
        return
    assert [x.name for x in layouts] == ["LBHNC"]
    assert layouts[0].is_layer_compact and layouts[0].is_block_contiguous
    assert not compat.backend_shapes_the_cache()


def test_kernel_block_sizes_with_and_without_a_spec():
    spec = SimpleNamespace(block_size=16)  # 0.32+ pass the layer's spec
    for sizes in (QoQKV4AttentionBackend.get_supported_kernel_block_sizes(),
                  QoQKV4AttentionBackend.get_supported_kernel_block_sizes(spec)):
        assert [s.base for s in sizes] == [16]


class _Mode033(IntEnum):
    """The KVQuantMode members of vLLM 0.33 that matter here (kv_cache_interface.py)."""

    NONE = 0
    INT4_PER_TOKEN_HEAD = 4
    OCTAVE_K3V4 = 12
    CUSTOM = 12  # 0.33 gives CUSTOM the value of OCTAVE_K3V4: an alias


@dataclasses.dataclass(frozen=True)
class _Spec:  # the AttentionSpec fields customize_spec reads
    kv_quant_mode: _Mode033
    head_size: int
    state_content_bytes: int | None = None


def test_0_33_custom_quant_mode_gets_no_kv4_page_budget():
    # A dtype registered with register_kv_cache_dtype(...) -> KVQuantMode.CUSTOM reads
    # as OCTAVE_K3V4 in 0.33: we keep int4_per_token_head (docs/kv4.md, vLLM versions).
    assert _Mode033.CUSTOM is _Mode033.OCTAVE_K3V4
    custom = _Spec(_Mode033.CUSTOM, D)
    assert QoQKV4AttentionBackend.customize_spec(custom) is custom
    assert QoQKV4AttentionBackend.customize_spec(_Spec(_Mode033.INT4_PER_TOKEN_HEAD, D)) \
        .state_content_bytes == C


def test_installed_vllm_custom_mode_is_still_the_octave_alias():
    from vllm.v1.kv_cache_interface import KVQuantMode

    if not hasattr(KVQuantMode, "CUSTOM"):
        pytest.skip("KVQuantMode.CUSTOM arrives in 0.33")
    # When this fails, vLLM gave CUSTOM a value of its own: revisit register_kv_cache_dtype
    # (docs/kv4.md, "vLLM versions").
    assert KVQuantMode.CUSTOM is KVQuantMode.OCTAVE_K3V4
