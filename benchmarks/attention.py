"""Paged attention over a quantized KV cache: qoq KV4 vs vLLM's kernels, one run.

    python benchmarks/attention.py [--quick] [--out PATH] [--lib PATH]

Decode (one query token per sequence, batch 1..256, context 1k..32k) and prefill
(a chunk of new tokens attending causally to a context that holds the chunk:
a fresh prompt, and a chunk behind a cached prefix), for the Llama-3-8B
geometry (32 query heads, 8 KV heads, head_dim 128) and a head_dim-64 model
(Llama-3.2-1B: 32/8/64).  Implementations (rows' "impl"):
  qoq_kv4      what vllm_qoq's backend runs on the KV4 cache: decode = the fused
               kernel (torch.ops.qoq.kv4_attention); prefill = kv4_gather_dequant of
               the context into a dense workspace + vLLM's FlashAttention varlen
               (FA3 on Hopper), both inside the timed region (the host-side plan
               is built once, as the metadata builder does once per step)
  qoq_kv4_fused  the fused kernel for prefill too (VLLM_QOQ_KV4_PREFILL=fused)
  fa3_bf16     vLLM's FlashAttention 3 (vllm.vllm_flash_attn), bf16 paged cache
  fa3_fp8      the same with an fp8 (e4m3) cache and descales
  triton_int4  vLLM's Triton int4_per_token_head path (unified_attention_int4,
               2D launch: seq_threshold_3D unset)
  sdpa_bf16    torch SDPA on contiguous (not paged) bf16 K/V: a floor available
               without vLLM, decode only, batch <= 64
The vLLM baselines are imported lazily; when vLLM (or FA3) is missing the reason is
recorded under "skipped".  Every timing is a median over iterations with the L2
flushed before each, CUDA events, same process, same GPU.  "bytes" is what the kernel
must read (K/V pages of the context + q + out); "gbps" = bytes / time.

--flush (how the L2 is emptied before each timed call):
  read   (default) a read pass over a 256 MiB buffer: the L2 ends up holding clean lines,
         which the timed call evicts for free.
  write  zero a 256 MiB buffer (the protocol until 2026-11-22): the L2 ends up full of
         dirty lines (50 MB on the H100), and the timed call pays for writing them back
         to HBM while it reads.  Kept to compare with the older result files.
  none   no flush (small shapes then read from L2).

Output: benchmarks/results/attention-<device>.json
  {"device","date","torch","vllm","command","hbm_gbps","rows":[{"phase","batch",
   "context","q_len","q_heads","kv_heads","head_dim","impl","us","bytes","gbps",
   "pct_hbm"}],"skipped":{impl: reason}}

QOQ_KV4_LIB / --lib: load a separately built kernel library (torch.utils.cpp_extension
build of csrc/attention/*) instead of the vllm_qoq._C extension.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}
BLOCK = 16
GEOMETRIES = [(32, 8, 128), (32, 8, 64)]


def _hbm(name: str) -> float | None:
    for k, v in HBM_GBPS.items():
        if k in name:
            return v
    return None


FLUSHES = ("read", "write", "none")


class Timer:
    def __init__(self, iters: int, flush: str = "read"):
        if flush not in FLUSHES:
            raise ValueError(f"--flush {flush!r}: expected one of {', '.join(FLUSHES)}")
        self.iters, self.mode = iters, flush
        self.buf = torch.zeros(256 << 20, dtype=torch.uint8, device="cuda")

    def flush(self):
        if self.mode == "read":
            self.buf.view(torch.int32).sum()  # reads 256 MiB, writes 8 bytes
        elif self.mode == "write":
            self.buf.zero_()

    def __call__(self, fn) -> float:
        fn()  # warm-up (compiles Triton, picks kernels)
        fn()
        times = []
        for _ in range(self.iters):
            self.flush()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        return statistics.median(times)


class Case:
    """One batch: per-sequence context and query lengths, paged block tables."""

    def __init__(self, batch, ctx, q_len, hq, hkv, d):
        self.batch, self.ctx, self.q_len, self.hq, self.hkv, self.d = batch, ctx, q_len, hq, hkv, d
        self.blocks_per_seq = -(-ctx // BLOCK)
        self.num_blocks = batch * self.blocks_per_seq
        g = torch.Generator(device="cuda").manual_seed(0)
        perm = torch.randperm(self.num_blocks, device="cuda", generator=g).to(torch.int32)
        self.block_table = perm.view(batch, self.blocks_per_seq).contiguous()
        self.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.cu_q = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device="cuda")
        self.q = torch.randn(batch * q_len, hq, d, device="cuda", dtype=torch.bfloat16)
        self.out = torch.empty_like(self.q)
        self.scale = d**-0.5

    def bytes(self, per_token_head: float) -> float:
        kv = self.batch * self.ctx * self.hkv * per_token_head
        return kv + 2 * self.q.numel() * self.q.element_size()


# ---------------------------------------------------------------------------- impls
def _kv4_cache(case: Case):
    from vllm_qoq.reference import kv4 as ref

    shape = ref.kv_cache_shape(case.num_blocks, BLOCK, case.hkv, case.d)
    cache = torch.randint(0, 256, shape, dtype=torch.uint8, device="cuda")
    sz = ref.split_cache(cache, case.d)[1]
    sz[..., 0] = 0.05  # finite scales and zeros
    sz[..., 1] = 7.0
    return cache


def qoq_kv4_fused(case: Case):
    if case.q_len == 1:
        raise NotImplementedError("decode: qoq_kv4 is the fused kernel already")
    return _fused(case)


def _fused(case: Case):
    from vllm_qoq.attention import ops

    cache = _kv4_cache(case)

    def run():
        ops.kv4_attention(case.out, case.q, cache, case.block_table, case.seq_lens, case.cu_q,
                          case.q_len, case.ctx, case.scale, 0)

    return run, case.bytes(case.d + 8)


def qoq_kv4(case: Case):
    if case.q_len == 1:
        return _fused(case)  # decode: the backend's fused split-KV kernel
    from vllm_qoq import compat
    from vllm_qoq.attention import backend as kb

    fa = compat.flash_attn_varlen()
    if fa is None:
        raise RuntimeError("vLLM's FlashAttention is not importable: the backend would run "
                           "qoq_kv4_fused for prefill")
    cache = _kv4_cache(case)
    cap = kb.workspace_tokens(8192)  # vLLM's default max_num_batched_tokens
    qsl = list(range(0, (case.batch + 1) * case.q_len, case.q_len))
    # over-cap requests would run fused, as in the backend (none at these shapes)
    plan = kb.materialize(kb.plan_split(qsl, [case.ctx] * case.batch, 0, cap), "cuda")
    varlen = kb.flash_attn_varlen_runner(*fa)

    def workspace(rows):
        return kb.Workspace.get(rows, case.hkv, case.d, case.q.dtype, case.q.device, cap)

    def run():
        kb.run_split(plan, case.out, case.q, cache, case.block_table, case.seq_lens, case.cu_q,
                     case.ctx, case.scale, workspace, varlen)

    return run, case.bytes(case.d + 8)


def _fa(case: Case, fp8: bool):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    shape = (case.num_blocks, BLOCK, case.hkv, case.d)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    kw = {}
    if fp8:
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        one = torch.ones(case.batch, case.hkv, device="cuda", dtype=torch.float32)
        kw = dict(q_descale=one, k_descale=one, v_descale=one)
    q = case.q.to(torch.float8_e4m3fn) if fp8 else case.q

    def run():
        flash_attn_varlen_func(q, k, v, max_seqlen_q=case.q_len, cu_seqlens_q=case.cu_q,
                               max_seqlen_k=case.ctx, seqused_k=case.seq_lens,
                               softmax_scale=case.scale, causal=True, block_table=case.block_table,
                               out=case.out, fa_version=3, **kw)

    return run, case.bytes(case.d * 2 * (1 if fp8 else 2))


def fa3_bf16(case):
    return _fa(case, fp8=False)


def fa3_fp8(case):
    return _fa(case, fp8=True)


def triton_int4(case: Case):
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    padded = case.d // 2 + 4  # int4 data + an inline fp32 scale per (token, head), K then V
    kv = torch.randint(0, 256, (case.num_blocks, case.hkv, BLOCK, 2 * padded), dtype=torch.uint8,
                       device="cuda")
    base = torch.tensor([], dtype=torch.float32, device="cuda").set_(kv.untyped_storage())
    st = [s // 4 for s in kv.stride()]
    scales = [torch.as_strided(base, (case.num_blocks, BLOCK, case.hkv), (st[0], st[2], st[1]),
                               off // 4) for off in (case.d // 2, padded + case.d // 2)]
    for s in scales:
        s.fill_(0.05)
    key_cache, value_cache = kv.transpose(1, 2).split(padded, dim=-1)

    def run():
        unified_attention(q=case.q, k=key_cache, v=value_cache, out=case.out,
                          cu_seqlens_q=case.cu_q, max_seqlen_q=case.q_len, seqused_k=case.seq_lens,
                          max_seqlen_k=case.ctx, softmax_scale=case.scale, causal=True,
                          alibi_slopes=None, window_size=(-1, -1), block_table=case.block_table,
                          softcap=0, q_descale=None, k_descale=None, v_descale=None,
                          kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD,
                          k_scale_cache=scales[0], v_scale_cache=scales[1])

    return run, case.bytes(case.d + 8)


def sdpa_bf16(case: Case):
    if case.q_len != 1 or case.batch > 64:
        raise NotImplementedError("sdpa_bf16 floor: decode with batch <= 64 only")
    k = torch.randn(case.batch, case.hkv, case.ctx, case.d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = case.q.view(case.batch, case.hq, 1, case.d)

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=case.scale, enable_gqa=True)

    return run, case.bytes(case.d * 4)


IMPLS = {"qoq_kv4": qoq_kv4, "qoq_kv4_fused": qoq_kv4_fused, "fa3_bf16": fa3_bf16, "fa3_fp8": fa3_fp8,
         "triton_int4": triton_int4, "sdpa_bf16": sdpa_bf16}


def cases(quick: bool):
    if quick:
        decode = [(1, 4096), (64, 4096), (256, 4096), (64, 16384), (256, 32768)]
        prefill = [(1, 2048, 2048), (1, 2048, 8192)]
    else:
        decode = [(b, c) for b in (1, 16, 64, 128, 256) for c in (1024, 4096, 16384, 32768)]
        prefill = [(1, 2048, 2048), (1, 2048, 8192), (1, 512, 16384), (4, 1024, 4096),
                   (1, 8192, 8192)]
    for hq, hkv, d in GEOMETRIES:
        for b, c in decode:
            yield "decode", b, c, 1, hq, hkv, d
        for b, ql, c in prefill:
            yield "prefill", b, c, ql, hq, hkv, d


def summary_md(res: dict) -> str:
    """Markdown tables of one run: qoq KV4 next to each baseline, ratios of times."""
    t: dict = {}
    for r in res["rows"]:
        key = (r["phase"], r["batch"], r["context"], r.get("q_len"), r["head_dim"])
        t.setdefault(key, {})[r["impl"]] = r
    out = [f"# KV4 attention — {res['device']}", "",
           f"{res['date']}, torch {res['torch']}, vLLM {res['vllm']}, command `{res['command']}`. "
           f"32 query / 8 KV heads, bf16, block 16. µs per call; ratio = baseline time / qoq "
           f"time (> 1: qoq faster); % HBM = bytes the qoq call must read / "
           f"{res.get('hbm_gbps')} GB/s. L2 flush before each call: "
           f"{res.get('flush', 'write')} (see benchmarks/attention.py).", ""]
    for phase in ("decode", "prefill"):
        keys = sorted(k for k in t if k[0] == phase and "qoq_kv4" in t[k])
        if not keys:
            continue
        out += [f"## {phase}", "",
                "| batch | context | q_len | head_dim | qoq_kv4 | qoq_kv4_fused | fa3_bf16 | fa3_fp8 | "
                "triton_int4 | x fa3_bf16 | x fa3_fp8 | qoq % HBM |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            v = t[k]
            q = v["qoq_kv4"]["us"]
            cell = lambda n: f"{v[n]['us']:.1f}" if n in v else "—"  # noqa: E731
            ratio = lambda n: f"{v[n]['us'] / q:.2f}" if n in v else "—"  # noqa: E731
            out.append(f"| {k[1]} | {k[2]} | {k[3]} | {k[4]} | {q:.1f} | {cell('qoq_kv4_fused')} | "
                       f"{cell('fa3_bf16')} | {cell('fa3_fp8')} | {cell('triton_int4')} | "
                       f"{ratio('fa3_bf16')} | {ratio('fa3_fp8')} | {v['qoq_kv4'].get('pct_hbm')} |")
        out.append("")
    if res.get("skipped"):
        out += ["Skipped:", ""] + [f"- {k}: {v}" for k, v in res["skipped"].items()] + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few shapes, few iterations")
    ap.add_argument("--out", default=None, help="a .json file or a folder (default benchmarks/results)")
    ap.add_argument("--lib", default=os.environ.get("QOQ_KV4_LIB"))
    ap.add_argument("--impls", nargs="*", default=list(IMPLS))
    ap.add_argument("--phases", nargs="*", default=["decode", "prefill"])
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20, 5 with --quick)")
    ap.add_argument("--flush", choices=FLUSHES, default="read",
                    help="how the L2 is emptied before each timed call (see the module doc)")
    ap.add_argument("--markdown", default=None, metavar="JSON",
                    help="only (re)write the markdown summary of an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        src = Path(args.markdown)
        src.with_suffix(".md").write_text(summary_md(json.loads(src.read_text())))
        print(f"wrote {src.with_suffix('.md')}")
        return 0
    if args.lib:
        torch.ops.load_library(args.lib)
    from vllm_qoq.attention import ops

    ops.register_ops()
    dev = torch.cuda.get_device_name()
    hbm = _hbm(dev)
    skipped: dict[str, str] = {}
    if not ops.has_cuda_kernels():
        skipped["qoq_kv4"] = skipped["qoq_kv4_fused"] = "vllm_qoq KV4 CUDA kernels not built"
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception as e:  # noqa: BLE001
        vllm_version = None
        for k in ("fa3_bf16", "fa3_fp8", "triton_int4"):
            skipped[k] = f"vLLM not importable: {type(e).__name__}: {e}"
    timer = Timer(args.iters or (5 if args.quick else 20), args.flush)
    rows = []
    for phase, b, c, ql, hq, hkv, d in cases(args.quick):
        if phase not in args.phases:
            continue
        case = None
        for name in args.impls:
            if name in skipped:
                continue
            try:
                case = case or Case(b, c, ql, hq, hkv, d)
                fn, nbytes = IMPLS[name](case)
                us = timer(fn)
            except NotImplementedError:
                continue
            except Exception as e:  # noqa: BLE001  (a baseline failing must not stop the run)
                key = f"{name}@{phase},b{b},ctx{c},d{d}"
                skipped[key] = f"{type(e).__name__}: {str(e)[:300]}"
                torch.cuda.synchronize()
                continue
            gbps = nbytes / us / 1e3
            row = dict(phase=phase, batch=b, context=c, q_len=ql, q_heads=hq, kv_heads=hkv,
                       head_dim=d, impl=name, us=round(us, 2), bytes=int(nbytes), gbps=round(gbps, 1),
                       pct_hbm=round(100 * gbps / hbm, 1) if hbm else None)
            rows.append(row)
            print(json.dumps(row), flush=True)
            fn = None
        del case
        torch.cuda.empty_cache()
    out = {
        "device": dev,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "vllm": vllm_version,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "hbm_gbps": hbm,
        "flush": args.flush,
        "rows": rows,
        "skipped": skipped,
    }
    tag = dev.replace("NVIDIA ", "").replace(" ", "-")
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results"
    if path.is_dir() or not path.suffix:  # a folder, like gemm.py's --out
        path = path / f"attention-{tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    path.with_suffix(".md").write_text(summary_md(out))
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
