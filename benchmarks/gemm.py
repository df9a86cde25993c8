"""W4A8 GEMM benchmark: vllm_qoq's kernels next to the usual alternatives, one run, one GPU.

    python benchmarks/gemm.py --out benchmarks/results            # full sweep
    python benchmarks/gemm.py --quick --out benchmarks/results     # 2 shapes, 4 Ms

Per (M, N, K) it times (GEMM only; activation quantization is not included for any
method, so qoq/fp8/int8 are compared on equal terms and BF16 is flattered slightly):
  qoq_chn, qoq_g128     vllm_qoq W4A8 (per-channel / progressive g128), torch.ops.qoq
  bf16                  cuBLAS via torch.matmul
  fp8                   cuBLAS via torch._scaled_mm, per-token x per-channel fp32 scales
  int8_w8a8             vLLM cutlass_scaled_mm (per-token x per-channel)
  machete_w4a16         vLLM machete_mm, uint4b8, g128, bf16 activations
  marlin_w4a16          vLLM marlin_gemm, uint4b8, g128, bf16 activations
  marlin_w4a8           vLLM marlin_gemm with int8 activations (W4A8-INT8), uint4b8
  qoq_chn@P, qoq_g128@P one forced kernel path P (1, 3, 4, 5, 6, 7, 8) through
                        qoq_debug::w4a8_acc, int32 accumulators out (no float epilogue);
                        qoq_chn@P:bf16 the same path with the real bf16 epilogue
                        (qoq_debug::w4a8_gemm), e.g. --impls qoq_chn@3:bf16,qoq_chn@7:bf16
vLLM is imported lazily; a baseline that cannot run is skipped and the reason recorded.

Timing: each method's calls are captured in a CUDA graph and the graph is replayed
(median of several replays, CUDA events).  The operands are replicated into enough
copies that one replay touches more than 3x the L2 cache, so every call reads its
weights from HBM.  Reported: us, TOPS (2*M*N*K), % of the dense peak of the method's
tensor-core type (H100 SXM: INT8/FP8 1979, BF16 989) and % of HBM bandwidth (3.35 TB/s)
for the bytes the call must move (weights + activations + output, read/written once).

Also times the activation quantizer (qoq::quantize_per_token, bf16 in -> int8 + scale +
row sum) for each (M, K) of the sweep: "quant_rows": [{"M","K","us"}] in the JSON, % of
HBM bandwidth in the summary (bytes = 2*M*K read + M*K + 8*M written).

Writes <out>/gemm-<device>.json ({"device","date","torch","vllm","command","rows":[{"M",
"N","K","impl","us"}], "quant_rows": [...], "skipped": [...]}), gemm-<device>.md (summary)
and gemm-<device>.png (matplotlib, if installed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import statistics
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPES = {
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama3-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
}
MS = [1, 16, 64, 256, 1024, 4096, 16384]
QUICK_SHAPES = [(4096, 4096), (28672, 4096)]
QUICK_MS = [1, 16, 64, 1024, 4096]
IMPLS = ["qoq_chn", "qoq_g128", "bf16", "fp8", "int8_w8a8", "machete_w4a16", "marlin_w4a16",
         "marlin_w4a8"]

# H100 SXM datasheet numbers (docs/targets.md): dense tensor peaks and HBM3 bandwidth.
PEAK_TOPS = {"int8": 1979.0, "fp8": 1979.0, "bf16": 989.0}
HBM_TBPS = 3.35
IMPL_PEAK = {"qoq_chn": "int8", "qoq_g128": "int8", "bf16": "bf16", "fp8": "fp8",
             "int8_w8a8": "int8", "machete_w4a16": "bf16", "marlin_w4a16": "bf16",
             "marlin_w4a8": "int8"}
# bytes per weight element and per activation element as each method reads them
W_BYTES = {"qoq_chn": 0.5, "qoq_g128": 0.5, "bf16": 2, "fp8": 1, "int8_w8a8": 1,
           "machete_w4a16": 0.5, "marlin_w4a16": 0.5, "marlin_w4a8": 0.5}
A_BYTES = {"qoq_chn": 1, "qoq_g128": 1, "bf16": 2, "fp8": 1, "int8_w8a8": 1,
           "machete_w4a16": 2, "marlin_w4a16": 2, "marlin_w4a8": 1}


def min_bytes(impl, m, n, k):
    impl = impl.split("@")[0]
    return W_BYTES[impl] * n * k + A_BYTES[impl] * m * k + 2 * m * n


class Skip(Exception):
    pass


# ------------------------------------------------------------------ operand builders
# Each builder returns a closure running one GEMM on one copy of its operands (random,
# valid data; never zeros).  `gen` is a CUDA generator.
def _rand_u8(shape, gen, lo=0, hi=256):
    return torch.randint(lo, hi, shape, device="cuda", dtype=torch.uint8, generator=gen)


def build_qoq(variant, m, n, k, gen, path=None, epilogue=False):
    """The qoq GEMM as the real ops run it, or (path given) one kernel path forced through
    qoq_debug::w4a8_acc (int32 accumulators out, no float epilogue): `--impls
    qoq_chn@1,qoq_chn@5` compares the mma.sync kernel (1) with the dp4a GEMV (5);
    6 = the mma.sync weight stream (M <= 32), 8 = the same through per-warp rings; 3/4 = wgmma without/with CTA-pair multicast;
    7 = persistent wgmma (path 3 where the tiles fit in one wave).  With epilogue=True
    (`qoq_chn@7:bf16`) the forced path runs the real ops' computation, bf16 out, through
    qoq_debug::w4a8_gemm (A/B of paths with the float epilogue in one run)."""
    from vllm_qoq import ops

    ops.register_ops()
    if not ops.has_cuda_kernels():
        raise Skip(f"vllm_qoq._C not built: {ops.extension_error()}")
    if variant == "g128" and k % 128:
        raise Skip("g128 needs K % 128 == 0")
    if (path == 5 and m > 16) or (path in (6, 8) and m > 32):
        raise Skip(f"path {path} does not serve M={m}")
    if path in (2, 3, 4, 7) and not torch.ops.qoq_debug.sm90_available():
        raise Skip("no sm_90a kernels on this GPU/build")
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    qx, sx, qsum = ops.quantize_per_token(x)
    # Random codes in the kernel layout (a permutation of random codes is random codes).
    qweight = _rand_u8((n, k // 2), gen)
    scales = (torch.rand(n, device="cuda", generator=gen) * 0.01 + 0.001).half()
    if variant == "chn":
        if path is not None and not epilogue:
            return lambda: torch.ops.qoq_debug.w4a8_acc(qx, qweight, None, None, n, path)
        szeros = (torch.rand(n, device="cuda", generator=gen) * 0.1).half()
        if path is not None:
            return lambda: torch.ops.qoq_debug.w4a8_gemm(qx, sx, qsum, qweight, scales, szeros,
                                                         None, None, None, torch.bfloat16, path)
        return lambda: ops.w4a8_chn_gemm(qx, sx, qsum, qweight, scales, szeros, None,
                                         torch.bfloat16)
    g = k // 128
    s2 = _rand_u8((g, n), gen, 1, 9)  # q8 = s2*(u - 8) stays inside int8
    zneg = ((256 - 8 * s2.int()) % 256).to(torch.uint8)
    if path is not None and epilogue:
        return lambda: torch.ops.qoq_debug.w4a8_gemm(qx, sx, None, qweight, scales, None, s2, zneg,
                                                     None, torch.bfloat16, path)
    if path is not None:
        return lambda: torch.ops.qoq_debug.w4a8_acc(qx, qweight, s2, zneg, n, path)
    return lambda: ops.w4a8_g128_gemm(qx, sx, qweight, scales, s2, zneg, None, torch.bfloat16)


def build_bf16(m, n, k, gen):
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    return lambda: torch.matmul(x, w.t())


def build_fp8(m, n, k, gen):
    if not hasattr(torch, "float8_e4m3fn"):
        raise Skip("torch has no float8_e4m3fn")
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device="cuda", generator=gen).to(torch.float8_e4m3fn)
    sa = torch.rand(m, 1, device="cuda", generator=gen) + 0.5
    sb = torch.rand(1, n, device="cuda", generator=gen) + 0.5
    fn = lambda: torch._scaled_mm(x, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    fn()
    return fn


def _vllm():
    try:
        import vllm._custom_ops as vops  # noqa: F401
        from vllm.scalar_type import scalar_types  # noqa: F401
    except Exception as e:  # noqa: BLE001
        raise Skip(f"vLLM not importable: {type(e).__name__}: {e}") from None
    return vops


def build_int8_w8a8(m, n, k, gen):
    vops = _vllm()
    if not hasattr(torch.ops._C, "cutlass_scaled_mm"):
        raise Skip("vLLM has no cutlass_scaled_mm")
    a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=gen).t()
    sa = torch.rand(m, 1, device="cuda", generator=gen) + 0.5
    sb = torch.rand(n, 1, device="cuda", generator=gen) + 0.5
    fn = lambda: vops.cutlass_scaled_mm(a, b, sa, sb, torch.bfloat16)
    fn()
    return fn


def _gptq_codes(k, n, gen):
    return torch.randint(0, 16, (k, n), device="cuda", dtype=torch.int32, generator=gen)


def build_machete(m, n, k, gen):
    vops = _vllm()
    from vllm.scalar_type import scalar_types

    if not hasattr(torch.ops._C, "machete_mm"):
        raise Skip("vLLM has no machete_mm (needs sm_90)")
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        pack_quantized_values_into_int32,
    )

    wt = scalar_types.uint4b8
    w_q = pack_quantized_values_into_int32(_gptq_codes(k, n, gen), wt, packed_dim=0)
    w_q = vops.machete_prepack_B(w_q.t().contiguous().t(), a_type=torch.bfloat16, b_type=wt,
                                 group_scales_type=torch.bfloat16)
    s = (torch.rand(k // 128, n, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    fn = lambda: vops.machete_mm(a=x, b_q=w_q, b_type=wt, b_group_scales=s, b_group_size=128)
    fn()
    return fn


def _marlin(m, n, k, gen, act_int8):
    vops = _vllm()
    from vllm.scalar_type import scalar_types

    if not hasattr(torch.ops._C, "marlin_gemm"):
        raise Skip("vLLM has no marlin_gemm")
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import marlin_quantize

    wt = scalar_types.uint4b8
    w = torch.randn(k, n, device="cuda", generator=gen, dtype=torch.bfloat16)
    in_dtype = torch.int8 if act_int8 else None
    _, q_w, s, g_idx, sort_idx, _ = marlin_quantize(w, wt, 128, False, input_dtype=in_dtype)
    del w
    ws = mu.marlin_make_workspace_new(torch.device("cuda"), 4)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    a_scales = None
    if act_int8:
        s, gscale = mu.marlin_act_int8_process_scales(s)
        xq, a_scales = mu.marlin_quant_input(x, torch.int8)
        a_scales = a_scales * gscale
        x = xq
    fn = lambda: vops.marlin_gemm(x, None, q_w, None, s, a_scales, None, None, g_idx, sort_idx,
                                  ws, wt, size_m=m, size_n=n, size_k=k, is_k_full=True,
                                  use_atomic_add=False, use_fp32_reduce=True, is_zp_float=False)
    fn()
    return fn


BUILDERS = {
    "qoq_chn": lambda m, n, k, g: build_qoq("chn", m, n, k, g),
    "qoq_g128": lambda m, n, k, g: build_qoq("g128", m, n, k, g),
    "bf16": build_bf16,
    "fp8": build_fp8,
    "int8_w8a8": build_int8_w8a8,
    "machete_w4a16": build_machete,
    "marlin_w4a16": lambda m, n, k, g: _marlin(m, n, k, g, False),
    "marlin_w4a8": lambda m, n, k, g: _marlin(m, n, k, g, True),
}


def quant_bytes(m, k):
    return 3 * m * k + 8 * m


def build_quant(m, k, gen):
    from vllm_qoq import ops

    ops.register_ops()
    if not ops.has_cuda_kernels():
        raise Skip(f"vllm_qoq._C not built: {ops.extension_error()}")
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    return lambda: ops.quantize_per_token(x)


# ------------------------------------------------------------------ timing
def time_us(impl, m, n, k, l2_bytes, max_copy_bytes, gen, reps=5):
    if impl == "act_quant":
        per_call, build = quant_bytes(m, k), lambda: build_quant(m, k, gen)
    else:
        if "@" in impl:  # qoq_chn@5: a forced kernel path (int32 out); qoq_chn@7:bf16: bf16 out
            variant, path = impl.split("@")
            path, _, out = path.partition(":")
            if out not in ("", "bf16"):
                raise Skip(f"unknown output suffix in {impl} (only :bf16)")
            builder = lambda m, n, k, g: build_qoq(variant[4:], m, n, k, g, int(path), out == "bf16")
        else:
            builder = BUILDERS[impl]
        per_call, build = min_bytes(impl, m, n, k), lambda: builder(m, n, k, gen)
    copies = max(1, min(math.ceil(3 * l2_bytes / per_call), int(max_copy_bytes // per_call)))
    copies = min(copies, 64)
    fns = [build() for _ in range(copies)]
    est_us = max(2.0, per_call / (HBM_TBPS * 1e6), 2 * m * n * k / (PEAK_TOPS["bf16"] * 1e6))
    us = time_graph(fns, est_us, reps)
    del fns
    return us


def time_graph(fns, est_us, reps=5):
    """Median µs per call of `fns` (closures over distinct operand copies), each call
    captured in one CUDA graph, enough rounds of them per replay that launch/graph overhead
    is amortised (>= ~2 ms of work at est_us per call)."""
    import torch

    loops = max(1, min(200, math.ceil(2000 / (est_us * len(fns)))))
    for f in fns:
        f()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        for f in fns:  # warm-up on the capture stream
            f()
        with torch.cuda.graph(graph):
            for _ in range(loops):
                for f in fns:
                    f()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / (loops * len(fns)))
    del graph
    return statistics.median(times)


def device_slug(name: str) -> str:
    for key in ("H100", "H200", "H20", "A100", "L40S", "L4", "B200"):
        if key in name:
            return key.lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def vllm_version():
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001
        return None


# ------------------------------------------------------------------ reports
def summary_md(res, skipped):
    rows = res["rows"]
    by = {}
    for r in rows:
        by.setdefault((r["N"], r["K"]), {}).setdefault(r["M"], {})[r["impl"]] = r["us"]
    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    impls += sorted({r["impl"] for r in rows} - set(IMPLS))  # forced paths (qoq_chn@5, ...)
    out = [f"# W4A8 GEMM benchmark — {res['device']}", "",
           f"date {res['date']}, torch {res['torch']}, vLLM {res['vllm']}, "
           f"command `{res['command']}`", "",
           "Times in µs (GEMM only, CUDA-graph replay, weights read from HBM). "
           "qoq vs: ratio of times (>1 = qoq faster). %HBM: bytes the qoq g128 call must move "
           f"over {HBM_TBPS} TB/s; %peak: qoq g128 TOPS over {PEAK_TOPS['int8']:.0f}.", ""]
    for (n, k), per_m in by.items():
        out.append(f"## N={n} K={k}")
        out.append("")
        head = ["M"] + impls + ["g128 TOPS", "g128 %peak", "g128 %HBM", "g128 vs fp8",
                                "g128 vs bf16", "g128 vs best W4A16"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for m in sorted(per_m):
            t = per_m[m]
            cells = [str(m)] + [f"{t[i]:.1f}" if i in t else "—" for i in impls]
            q = t.get("qoq_g128")
            if q:
                tops = 2 * m * n * k / q / 1e6
                cells += [f"{tops:.0f}", f"{100 * tops / PEAK_TOPS['int8']:.0f}%",
                          f"{100 * min_bytes('qoq_g128', m, n, k) / q / (HBM_TBPS * 1e6):.0f}%"]
                for ref in ("fp8", "bf16"):
                    cells.append(f"{t[ref] / q:.2f}x" if ref in t else "—")
                w4 = [t[i] for i in ("machete_w4a16", "marlin_w4a16") if i in t]
                cells.append(f"{min(w4) / q:.2f}x" if w4 else "—")
            else:
                cells += ["—"] * 6
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    q = res.get("quant_rows", [])
    if q:
        out.append("## Activation quantization (bf16 -> int8 per token + scale + row sum)")
        out.append("")
        out.append("| M | K | µs | %HBM |")
        out.append("|---|---|---|---|")
        for r in q:
            pct = 100 * quant_bytes(r["M"], r["K"]) / r["us"] / (HBM_TBPS * 1e6)
            out.append(f"| {r['M']} | {r['K']} | {r['us']:.1f} | {pct:.0f}% |")
        out.append("")
    if skipped:
        out.append("## Skipped")
        out.append("")
        for s in skipped:
            out.append(f"- {s['impl']}: {s['reason']}")
        out.append("")
    return "\n".join(out)


def plot(res, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib unavailable ({e})"
    shapes = sorted({(r["N"], r["K"]) for r in res["rows"]})
    if not shapes:
        return "no plot: no timed rows"
    cols = min(4, len(shapes))
    rows_ = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.5 * cols, 3.6 * rows_), squeeze=False)
    for ax, (n, k) in zip(axes.flat, shapes):
        for impl in IMPLS:
            pts = sorted((r["M"], 2 * r["M"] * n * k / r["us"] / 1e6) for r in res["rows"]
                         if r["impl"] == impl and (r["N"], r["K"]) == (n, k))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N={n} K={k}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TOPS")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"W4A8 GEMM, {res['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def write_results(res, stem, md_head=""):
    """<stem>.json, <stem>.md (md_head + the summary) and <stem>.png; prints the summary."""
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    md = md_head + summary_md(res, res["skipped"])
    note = plot(res, stem + ".png")
    if note:
        md += f"\n{note}\n"
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)
    print(f"wrote {stem}.json/.md" + ("" if note else "/.png"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--quick", action="store_true", help="2 Llama-3-8B shapes, 5 values of M")
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--m", default=None, help="comma-separated M values")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--tag", default="", help="suffix for the output file names (--tag=-x)")
    ap.add_argument("--no-quant", action="store_true", help="skip the activation-quant timings")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gemm.py needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    free, _ = torch.cuda.mem_get_info()
    max_copy = 0.25 * free
    if args.quick:
        shapes, ms = QUICK_SHAPES, QUICK_MS
    else:
        shapes = [s for mdl in args.models.split(",") for s in SHAPES[mdl]]
        ms = MS
    if args.m:
        ms = [int(v) for v in args.m.split(",")]
    impls = [i for i in args.impls.split(",") if i]
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = {"device": props.name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "vllm": vllm_version(),
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv or sys.argv[1:])),
           "rows": [], "quant_rows": [], "skipped": []}
    skipped_impls = {}
    try:
        from tqdm import tqdm
    except ImportError:  # noqa: BLE001
        tqdm = None
    work = [(n, k, m, i) for (n, k) in shapes for m in ms for i in impls]
    it = tqdm(work, desc="gemm", file=sys.stdout) if tqdm else work
    for n, k, m, impl in it:
        if impl in skipped_impls:
            continue
        try:
            us = time_us(impl, m, n, k, l2, max_copy, gen)
            res["rows"].append({"M": m, "N": n, "K": k, "impl": impl, "us": round(us, 3)})
        except Skip as e:
            if "@" not in impl:  # a forced path skips only the Ms it does not serve
                skipped_impls[impl] = str(e)
            res["skipped"].append({"impl": impl, "reason": str(e)})
        except Exception as e:  # noqa: BLE001  (record and go on: one broken baseline must not end the run)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (M={m} N={n} K={k})"
            res["skipped"].append({"impl": impl, "reason": reason})
            if not impl.startswith("qoq_"):
                skipped_impls[impl] = reason
            traceback.print_exc(limit=2)
        finally:
            torch.cuda.empty_cache()
    if not args.no_quant and ("qoq_chn" in impls or "qoq_g128" in impls):
        for k in sorted({k for _, k in shapes}):
            for m in ms:
                try:
                    us = time_us("act_quant", m, 0, k, l2, max_copy, gen)
                    res["quant_rows"].append({"M": m, "K": k, "us": round(us, 3)})
                except Exception as e:  # noqa: BLE001
                    res["skipped"].append({"impl": "act_quant", "reason": f"{type(e).__name__}: {e}"})
                    break
                finally:
                    torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    write_results(res, os.path.join(args.out, f"gemm-{device_slug(props.name)}{args.tag}"))
    if not res["rows"]:
        print("gemm.py: nothing was timed (every row skipped; reasons above and under 'skipped')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
