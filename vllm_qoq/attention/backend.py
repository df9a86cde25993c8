"""vLLM attention backend for the KV4 cache (the CUSTOM slot of the registry).

Selected with `--kv-cache-dtype int4_per_token_head --attention-backend CUSTOM`
for any model, and automatically for qoq checkpoints with kv_cache_bits == 4
(vllm_qoq/attention/__init__.py).  The page layout and the math are those of
vllm_qoq/reference/kv4.py; the work is done by torch ops
(vllm_qoq/attention/ops.py): `kv4_cache_write` (called by vLLM through
do_kv_cache_update, before attention), `kv4_attention` (the fused paged kernel:
every query token attends causally to the KV4 pages of its sequence) and
`kv4_gather_dequant` (dense K/V of whole sequences).

Two paths on CUDA (docs/kv4.md, "Paths"):
  * decode requests (<= reorder_batch_threshold query tokens; vLLM puts them
    first) and everything when the prefill path is off: the fused split-KV
    kernel `kv4_attention`;
  * prefill / chunked-prefill / prefix-hit requests: `kv4_gather_dequant` of
    their whole context (prefix, earlier chunks and the current chunk, all from
    the KV4 cache) into a dense workspace, then vLLM's FlashAttention varlen with
    causal=True (mask aligned bottom-right = our semantics).  Requests are
    grouped so a group's context fits the workspace cap; a request longer than
    the cap runs on the fused kernel.
The split and the grouping are computed on the host in the builder (from vLLM's
CPU copies, never syncing the GPU): plan_split() / run_split() are plain
functions so CPU tests drive them with reference ops.  On CPU the impl runs the
reference `kv4_attention` for everything, so CPU CI exercises this whole class.

CUDA graphs: uniform single-token decode batches.  The launch shape depends only
on host values fixed at capture (batch size, max_query_len == 1, and the
max_seq_len that build_for_cudagraph_capture raises to max_model_len); the
kernels read the real lengths from the persistent seq_lens / block_table
buffers at replay.  Such batches have no prefill part, so they take the single
fused launch exactly as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from .. import compat
from ..reference import kv4 as ref
from . import ops

logger = logging.getLogger(__name__)

# Head sizes the CUDA kernels are compiled for (csrc/attention/kv4_attention.cu).
CUDA_HEAD_SIZES = (64, 128)
BLOCK_MULTIPLE = 16  # a 16-token tile of the kernels never straddles a page

# The prefill path (gather + FlashAttention varlen): "auto" (when vLLM's
# FlashAttention is importable) or "fused" (the fused kernel for every request).
PREFILL_ENV = "VLLM_QOQ_KV4_PREFILL"
PREFILL_MODES = ("auto", "fused")
# Workspace cap in tokens of context per prefill group (K and V, Hkv x D each, in
# the query dtype); default max(max_num_batched_tokens, MIN_WORKSPACE_TOKENS).
WORKSPACE_ENV = "VLLM_QOQ_KV4_WORKSPACE_TOKENS"
MIN_WORKSPACE_TOKENS = 32768
FA_HEAD_SIZES = (64, 128, 256)


def prefill_mode() -> str:
    mode = os.environ.get(PREFILL_ENV, "auto").strip().lower() or "auto"
    if mode not in PREFILL_MODES:
        raise ValueError(f"{PREFILL_ENV}={mode!r}: expected one of {PREFILL_MODES}")
    return mode


def workspace_tokens(max_num_batched_tokens: int) -> int:
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        return max(1, int(env))
    return max(int(max_num_batched_tokens), MIN_WORKSPACE_TOKENS)


# ---------------------------------------------------------------- the split plan
@dataclass
class _RequestRange:
    """Requests [req_start, req_end) = tokens [tok_start, tok_end) of the batch."""

    req_start: int
    req_end: int
    tok_start: int
    tok_end: int
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class PrefillGroup(_RequestRange):
    """A range for gather + varlen."""

    num_k: int  # workspace rows: sum of the requests' seq_lens
    cu_seqlens_q: list | torch.Tensor  # [n + 1] int32, rebased to tok_start
    cu_seqlens_k: list | torch.Tensor  # [n + 1] int32


@dataclass
class FusedRun(_RequestRange):
    """A range whose context exceeds the cap: the fused kernel."""

    query_start_loc: list | torch.Tensor  # [n + 1] int32, rebased to tok_start


@dataclass
class SplitPlan:
    num_decodes: int  # requests [0, num_decodes): the fused kernel, one launch
    num_decode_tokens: int
    max_decode_query_len: int
    groups: list[PrefillGroup] = field(default_factory=list)
    fused: list[FusedRun] = field(default_factory=list)
    # varlen(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    varlen: Callable | None = None


def plan_split(query_start_loc: list[int], seq_lens: list[int], num_decodes: int,
               cap_tokens: int) -> SplitPlan:
    """Host plan of a decode-first batch (plain ints; no tensors, no device).

    query_start_loc [B + 1] and seq_lens [B] (context incl. this step's tokens; only
    the entries of requests >= num_decodes are read) are vLLM's host copies.
    Requests after the decodes with query tokens are packed, in order, into groups
    whose summed seq_lens stay <= cap_tokens; a request longer than the cap goes to
    a fused run (consecutive ones share a run); requests without query tokens
    (padding) end a group and are skipped.
    """
    nreq = len(query_start_loc) - 1
    nd = num_decodes
    qlens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(nreq)]
    plan = SplitPlan(num_decodes=nd, num_decode_tokens=query_start_loc[nd],
                     max_decode_query_len=max(qlens[:nd], default=0))
    cur: PrefillGroup | None = None
    for r in range(nd, nreq):
        ql, sl = qlens[r], int(seq_lens[r])
        if ql <= 0:
            cur = None
            continue
        if sl < ql:
            raise ValueError(f"request {r}: seq_len {sl} is shorter than its {ql} query tokens")
        t0, t1 = query_start_loc[r], query_start_loc[r + 1]
        if sl > cap_tokens:
            cur = None
            run = plan.fused[-1] if plan.fused else None
            if run is None or run.req_end != r:
                run = FusedRun(r, r, t0, t0, 0, 0, [0])
                plan.fused.append(run)
            run.req_end, run.tok_end = r + 1, t1
            run.max_seqlen_q, run.max_seqlen_k = max(run.max_seqlen_q, ql), max(run.max_seqlen_k, sl)
            run.query_start_loc.append(t1 - run.tok_start)
            continue
        if cur is None or cur.num_k + sl > cap_tokens:
            cur = PrefillGroup(r, r, t0, t0, 0, 0, 0, [0], [0])
            plan.groups.append(cur)
        cur.req_end, cur.tok_end = r + 1, t1
        cur.max_seqlen_q, cur.max_seqlen_k = max(cur.max_seqlen_q, ql), max(cur.max_seqlen_k, sl)
        cur.num_k += sl
        cur.cu_seqlens_q.append(t1 - cur.tok_start)
        cur.cu_seqlens_k.append(cur.num_k)
    return plan


def materialize(plan: SplitPlan, device) -> SplitPlan:
    """Move the plan's offset arrays to `device` in one (pinned, non-blocking) copy."""
    arrays = [a for g in plan.groups for a in (g.cu_seqlens_q, g.cu_seqlens_k)]
    arrays += [run.query_start_loc for run in plan.fused]
    if not arrays:
        return plan
    flat = torch.tensor([x for a in arrays for x in a], dtype=torch.int32)
    device = torch.device(device)
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    else:
        flat = flat.to(device)
    views, o = [], 0
    for a in arrays:
        views.append(flat[o : o + len(a)])
        o += len(a)
    it = iter(views)
    for g in plan.groups:
        g.cu_seqlens_q, g.cu_seqlens_k = next(it), next(it)
    for run in plan.fused:
        run.query_start_loc = next(it)
    return plan


class Workspace:
    """Grow-only dense K/V buffers [2, rows, Hkv, D], one per (device, stream, dtype, Hkv, D).

    Shared by all layers (they run one after another on a stream); at most the cap.
    """

    _buffers: ClassVar[dict] = {}

    @classmethod
    def get(cls, rows: int, num_kv_heads: int, head_size: int, dtype, device, cap: int):
        stream = torch.cuda.current_stream(device).cuda_stream if torch.device(device).type == "cuda" else 0
        key = (str(device), stream, dtype, num_kv_heads, head_size)
        buf = cls._buffers.get(key)
        if buf is None or buf.shape[1] < rows:
            size = max(rows, min(cap, 2 * (0 if buf is None else buf.shape[1])))
            cls._buffers.pop(key, None)
            buf = torch.empty(2, size, num_kv_heads, head_size, dtype=dtype, device=device)
            cls._buffers[key] = buf
        return buf[0, :rows], buf[1, :rows]


def run_split(plan: SplitPlan, out, q, kv_cache, block_table, seq_lens, query_start_loc,
              max_seq_len: int, scale: float, workspace: Callable, varlen: Callable) -> None:
    """Execute a SplitPlan: decodes and over-cap requests fused, groups gather + varlen.

    out/q [T, Hq, D]; the other tensors are the batch's (device) metadata.
    workspace(rows) -> (k [rows, Hkv, D], v [rows, Hkv, D]);
    varlen(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    writes causal (bottom-right aligned) attention into out.
    """
    nd, ndt = plan.num_decodes, plan.num_decode_tokens
    if nd > 0 and ndt > 0:
        ops.kv4_attention(out[:ndt], q[:ndt], kv_cache, block_table[:nd], seq_lens[:nd],
                          query_start_loc[: nd + 1], plan.max_decode_query_len, max_seq_len,
                          scale, 0)
    for run in plan.fused:
        t0, t1 = run.tok_start, run.tok_end
        ops.kv4_attention(out[t0:t1], q[t0:t1], kv_cache, block_table[run.req_start : run.req_end],
                          seq_lens[run.req_start : run.req_end], run.query_start_loc,
                          run.max_seqlen_q, run.max_seqlen_k, scale, 0)
    for g in plan.groups:
        k, v = workspace(g.num_k)
        ops.kv4_gather_dequant(kv_cache, block_table[g.req_start : g.req_end], g.cu_seqlens_k,
                               g.max_seqlen_k, k, v)
        t0, t1 = g.tok_start, g.tok_end
        varlen(q[t0:t1], k, v, out[t0:t1], g.cu_seqlens_q, g.cu_seqlens_k, g.max_seqlen_q,
               g.max_seqlen_k, scale)


def flash_attn_varlen_runner(fa, fa_version: int) -> Callable:
    """The varlen callable of run_split on vLLM's FlashAttention (causal = bottom-right)."""

    def varlen(q, k, v, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale):
        fa(q, k, v, max_seqlen_q=max_seqlen_q, cu_seqlens_q=cu_seqlens_q, max_seqlen_k=max_seqlen_k,
           cu_seqlens_k=cu_seqlens_k, softmax_scale=scale, causal=True, out=out,
           fa_version=fa_version)

    return varlen


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
        # 0.26/0.28 (0.32+ never call it: kv4_cache_layouts + compat.kv4_pages).
        # Always the KV4 layout: vLLM also calls this to probe where the block dim is.
        # A layer that is not int4_per_token_head never reaches the impl (its
        # __init__ refuses other cache dtypes).
        return ref.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def supported_kv_cache_layouts(cls):
        """0.32+: the layouts whose blocks compat.kv4_pages re-reads as our pages."""
        return compat.kv4_cache_layouts()

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
    split: SplitPlan | None = None  # the prefill path; None: one fused launch
    workspace_tokens: int = MIN_WORKSPACE_TOKENS


class QoQKV4MetadataBuilder(compat.AttentionMetadataBuilder[QoQKV4Metadata]):
    _cudagraph_support: ClassVar = compat.AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int | None = 1  # decodes first (split_decodes_and_prefills)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._max_model_len = compat.max_model_len(vllm_config)
        compat.init_reorder_batch_threshold(self, 1)
        self._cap = workspace_tokens(compat.max_num_batched_tokens(vllm_config))
        self._varlen = None
        head_size = getattr(kv_cache_spec, "head_size", None)
        if (prefill_mode() == "auto" and torch.device(device).type == "cuda" and _on_cuda()
                and ops.has_cuda_kernels() and head_size in FA_HEAD_SIZES):
            fa = compat.flash_attn_varlen()
            if fa is not None:
                self._varlen = flash_attn_varlen_runner(*fa)
            else:
                logger.info("vllm_qoq KV4: vLLM's FlashAttention is not available: "
                            "prefill runs on the fused KV4 kernel")

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
            split=self._plan(cam),
            workspace_tokens=self._cap,
        )

    def _plan(self, cam) -> SplitPlan | None:
        """The prefill path's plan from host copies only (None: one fused launch)."""
        threshold = self.reorder_batch_threshold or 1
        if self._varlen is None or int(cam.max_query_len) <= threshold:
            return None
        lens = compat.seq_lens_cpu(cam)
        if lens is None:  # no exact host copy: do not sync, run fused
            return None
        nd, num_prefills, _ = compat.split_decodes_and_prefills(cam, threshold)
        if num_prefills == 0:
            return None
        nreq = int(cam.num_reqs)
        plan = plan_split(cam.query_start_loc_cpu[: nreq + 1].tolist(), lens[:nreq].tolist(), nd,
                          self._cap)
        plan.varlen = self._varlen
        return materialize(plan, self.device)

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
        kv_cache = compat.kv4_pages(kv_cache, self.num_kv_heads, self.head_size)
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
        kv_cache = compat.kv4_pages(kv_cache, self.num_kv_heads, self.head_size)
        plan = attn_metadata.split
        if plan is not None:
            cap = attn_metadata.workspace_tokens

            def workspace(rows: int):
                return Workspace.get(rows, self.num_kv_heads, self.head_size, q.dtype, q.device, cap)

            run_split(plan, out, q, kv_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                      attn_metadata.query_start_loc, attn_metadata.max_seq_len, self.scale,
                      workspace, plan.varlen)
            return output
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
